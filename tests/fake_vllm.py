"""A stand-in for the few vLLM APIs the ``vllm`` engine calls, so its logic runs without vLLM or a
GPU: ``LLM`` (a transformers copy of the checkpoint it is given, sampled by the ``hf`` engine and
returned as vLLM's ``RequestOutput``-shaped objects: ``outputs[k].token_ids``, ``.logprobs`` as one
``{token_id: Logprob}`` dict per position, ``.text``, ``.finish_reason``), ``sleep(level)`` /
``wake_up(tags)`` with vLLM's rules (nothing runs on a part that sleeps; level 2 drops the weights:
here they become NaN, so a weight the sync misses poisons the next generation), the in-process
model at ``llm_engine.model_executor.driver_worker.worker.model_runner.model`` whose
``load_weights`` takes transformers names only (an unknown name is a KeyError, as vLLM's own), and
``reset_prefix_cache``. Every call is logged in ``LLM.events``; ``LLM.instances`` holds them all.

``install(monkeypatch, version)`` puts it in ``sys.modules["vllm"]``."""
from __future__ import annotations

import sys
import types
from types import SimpleNamespace
from typing import ClassVar

import torch


class SamplingParams:
    def __init__(self, n=1, max_tokens=16, temperature=1.0, top_p=1.0, stop=None, logprobs=None, seed=None,
                 detokenize=True):
        self.detokenize = detokenize
        self.n, self.max_tokens, self.temperature, self.top_p = n, max_tokens, temperature, top_p
        self.stop, self.logprobs, self.seed = stop, logprobs, seed


class _Model:
    def __init__(self, llm):
        self.llm = llm

    def load_weights(self, weights):
        assert self.llm.awake["weights"], "load_weights while the weights sleep"
        params = dict(self.llm.hf.named_parameters())
        names = []
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)  # KeyError: a name vLLM's model does not have
                names.append(name)
        self.llm.events.append(("load_weights", tuple(names)))
        return set(names)


class LLM:
    instances: ClassVar[list] = []

    def __init__(self, model, seed=0, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model, self.seed, self.kwargs = model, seed, kwargs
        self.hf = AutoModelForCausalLM.from_pretrained(model).eval()
        self.tok = (SimpleNamespace(eos_token_id=None, pad_token_id=0, batch_decode=lambda rows, **kw: [""] * len(rows))
                    if kwargs.get("skip_tokenizer_init") else AutoTokenizer.from_pretrained(model))  # no text: ids only
        self.awake = {"weights": True, "kv_cache": True}
        self.events: list = []
        runner = SimpleNamespace(model=_Model(self))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
            driver_worker=SimpleNamespace(worker=SimpleNamespace(model_runner=runner))))
        LLM.instances.append(self)

    def get_tokenizer(self):
        return self.tok

    def generate(self, inputs, params, use_tqdm=True):
        from agentopd.inference.hf import HFEngine

        assert all(self.awake.values()), f"generate while asleep: {self.awake}"
        self.events.append("generate")
        engine = HFEngine(self.hf, self.tok, device="cpu")
        outs = []
        for inp, p in zip(inputs, params):
            [gens] = engine.generate([inp["prompt_token_ids"]], n=p.n, max_new_tokens=p.max_tokens,
                                     temperature=p.temperature, top_p=p.top_p, stop=p.stop, seed=p.seed)
            outs.append(SimpleNamespace(outputs=[
                SimpleNamespace(token_ids=tuple(g.response_ids), text=g.text, finish_reason=g.finish_reason,
                                logprobs=[{t: SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(g.response_ids, g.logprobs)])
                for g in gens]))
        return outs

    def sleep(self, level=1):
        assert self.kwargs.get("enable_sleep_mode"), "sleep needs LLM(enable_sleep_mode=True)"
        self.events.append(("sleep", level))
        self.awake = dict.fromkeys(self.awake, False)
        if level == 2:  # the weights are gone: only a full load_weights brings them back
            with torch.no_grad():
                for p in self.hf.parameters():
                    p.fill_(float("nan"))

    def wake_up(self, tags=None):
        tags = list(tags or self.awake)
        self.events.append(("wake_up", tuple(tags)))
        for t in tags:
            self.awake[t] = True

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")


def install(monkeypatch, version: str = "0.11.0") -> types.ModuleType:
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.__version__ = LLM, SamplingParams, version
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(LLM, "instances", [])
    return module

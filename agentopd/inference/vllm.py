"""The ``vllm`` engine: offline ``vllm.LLM`` generation with per-token log-probs (extra
``agentopd[vllm]``, imported only when this engine is built; vLLM needs a GPU).

Token ids are the source of truth, as in the ``hf`` engine: prompts go in as token ids and every
Generation carries the sampled ids and their log-probs. ``logprobs_mode="processed_logprobs"``
(the default here) makes those the log-probs of the distribution each id was drawn from (after
temperature and top-p), like the ``hf`` engine's; vLLM's own default is the raw model's.

Training, colocated: the learner and vLLM share the GPU and the process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set for that), and :meth:`VLLMEngine.load_weights` copies
the learner's weights into vLLM's model after each update. ``VLLMEngine.colocated(path, ...)`` is a
factory for ``agentopd.train.train(cfg, engine=...)``: the engine it builds syncs the learner's
weights at the start of every ``generate`` call. Keep ``gpu_memory_utilization`` low enough to leave
room for the learner. Full-parameter models only (merge LoRA adapters before syncing).
"""
from __future__ import annotations

import os


class VLLMEngine:
    def __init__(self, model: str, seed: int = 0, colocate: bool = True, sync_from=None,
                 logprobs_mode: str | None = "processed_logprobs", **llm_kwargs):
        """``model``: a checkpoint dir or hub id; ``llm_kwargs`` go to ``vllm.LLM`` (e.g.
        ``gpu_memory_utilization``, ``dtype``, ``max_model_len``). ``sync_from``: a learner model
        whose weights are loaded before every ``generate``."""
        try:
            import vllm
        except ImportError:
            raise ImportError("the vllm engine needs vLLM: pip install 'agentopd[vllm]'") from None
        if colocate:  # the engine core runs in this process, so load_weights reaches its model
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if logprobs_mode is not None:
            llm_kwargs["logprobs_mode"] = logprobs_mode
        self._vllm = vllm
        self.llm = vllm.LLM(model=model, seed=seed, **llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.sync_from = sync_from

    @classmethod
    def colocated(cls, path: str, **kwargs):
        """``engine(model, tokenizer, device)`` for the training loop: a vLLM engine on ``path``
        (the learner's initial checkpoint) that follows the learner's weights."""
        def build(model, tokenizer=None, device=None):
            return cls(path, sync_from=model, **kwargs)

        return build

    def generate(self, prompt_ids, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop=None, seed=None):
        from agentopd.types import Generation

        if self.sync_from is not None:
            self.load_weights(self.sync_from)
        params = [self._vllm.SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                            stop=list(stop or []) or None, logprobs=0,
                                            seed=None if seed is None else seed + i)
                  for i in range(len(prompt_ids))]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        result = []
        for out in outs:
            gens = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [float(step[t].logprob) for step, t in zip(c.logprobs or [], ids)]
                gens.append(Generation(response_ids=ids, logprobs=lps, text=c.text,
                                       finish_reason="length" if c.finish_reason == "length" else "stop"))
            result.append(gens)
        return result

    def _inner_model(self):
        """vLLM's model object when the engine runs in this process (V1 in-process, or V0)."""
        ex = getattr(getattr(self.llm, "llm_engine", None), "model_executor", None)
        worker = getattr(ex, "driver_worker", None)
        for w in (getattr(worker, "worker", None), worker):
            model = getattr(getattr(w, "model_runner", None), "model", None)
            if model is not None and hasattr(model, "load_weights"):
                return model
        return None

    def load_weights(self, model) -> None:
        """Copy ``model``'s weights (a transformers model, HF parameter names) into the engine,
        then drop the prefix cache (its KV entries came from the old weights)."""
        weights = [(name, t.detach()) for name, t in model.state_dict().items()]
        inner = self._inner_model()
        if inner is not None:
            inner.load_weights(weights)
        else:  # engine in worker processes: vLLM ships the function (and the weights) to each
            self.llm.apply_model(lambda m: m.load_weights(weights))
        self.llm.reset_prefix_cache()

"""The ``openai`` engine: sampling from any OpenAI-compatible server (a vLLM server, a llama.cpp
server, a hosted API) through the ``openai`` client (extra ``agentopd[llm]``).

``endpoint="chat"`` sends conversations to ``/chat/completions`` (:meth:`generate_chat`);
``endpoint="completions"`` sends raw text or token ids to ``/completions`` (:meth:`generate_text`,
:meth:`generate`). Each prompt is one request for ``n`` samples; a server that returns fewer
choices than asked (llama.cpp ignores ``n``) is asked again for the rest. ``concurrency`` bounds the
requests in flight. The ``openai`` client retries a timeout, a connection error and HTTP
408/409/429 or 5xx itself, at most ``max_retries`` times, with its own backoff (0.5 s doubling, at
most 8 s, or the server's ``Retry-After``); other HTTP errors (a bad request, a wrong key) fail at
once. What the client does not retry, an HTTP 200 reply without choices or whose body is not JSON,
is asked again here, at most ``max_retries`` more times, after ``backoff_s`` (doubling); so a
request costs at most ``(max_retries + 1) ** 2`` HTTP requests. When the retries run out the call
raises :class:`~agentopd.inference.EngineError`. The API key is read from the environment variable
named by ``api_key_env``.

A server works on text: ``Generation.text`` is always set; ``logprobs`` (with ``logprobs=True``)
and ``response_ids`` are filled only when the server returns them (token ids: vLLM's
``return_tokens_as_token_ids``, passed through ``extra_body``), else they are empty.

Seeds: with one ``seed`` per call, prompt ``i``'s request sends ``seed + i``. With ``seeds`` (one per
sample, as ``eval model`` and ``rlef`` pass them) a server still draws a request's ``n`` choices from
the request's one seed, so the request for samples ``j..n-1`` of a prompt sends a seed made from
those samples' seeds: asked again for the same samples (a resume that redoes whole problems, with
any ``eval.chunk``) it is the same request. A resume that redoes single samples of a problem (a
judge error, a torn last line) asks for fewer and gets other draws, unless ``seed_per_sample=True``:
one request per sample (``n=1``), each with its own seed, exact at the cost of ``n`` requests per
prompt (the prompt's tokens sent ``n`` times). Either way a server's seed is best effort (vLLM
honours it; hosted APIs say "mostly deterministic").
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

from agentopd.inference.base import Engine, EngineError, derive_seed
from agentopd.types import Generation


def requests_made(error) -> int:
    """How many HTTP requests the ``openai`` client made for a call before it raised ``error``
    (an ``openai.APIError``): it numbers its retries in each request's ``x-stainless-retry-count``
    header. 1 where the error names no request."""
    try:
        return int(error.request.headers.get("x-stainless-retry-count", 0)) + 1
    except (AttributeError, ValueError):
        return 1


class OpenAIEngine(Engine):
    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 endpoint: str = "chat", concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 3,
                 backoff_s: float = 1.0, logprobs: bool = False, extra_body: dict | None = None,
                 seed_per_sample: bool = False):
        if endpoint not in ("chat", "completions"):
            raise ValueError(f"openai engine: endpoint must be 'chat' or 'completions', got {endpoint!r}")
        try:
            from openai import OpenAI
        except ImportError:
            raise ImportError("the openai engine needs the openai client: pip install 'agentopd[llm]'") from None
        self.client = OpenAI(base_url=base_url or None, api_key=os.environ.get(api_key_env) or "EMPTY",
                             timeout=timeout_s, max_retries=max_retries)
        self.model, self.endpoint, self.api_key_env = model, endpoint, api_key_env
        self.concurrency, self.max_retries, self.backoff_s = max(1, concurrency), max_retries, backoff_s
        self.logprobs, self.extra_body = logprobs, dict(extra_body or {})
        self.seed_per_sample = seed_per_sample

    # ------------------------------------------------------------------------------ the API

    def generate_chat(self, conversations: list[list[dict]], n=1, max_new_tokens=256, temperature=1.0,
                      top_p=1.0, stop=None, seed=None, seeds=None) -> list[list[Generation]]:
        """``n`` answers to each conversation (``[{"role", "content"}, ...]``)."""
        self._need("chat", "generate_chat")
        return self._sample([{"messages": c} for c in conversations], n, max_new_tokens, temperature, top_p,
                            stop, seed, seeds)

    def generate_text(self, prompts: list[str], n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop=None,
                      seed=None, seeds=None) -> list[list[Generation]]:
        """``n`` continuations of each raw text prompt."""
        self._need("completions", "generate_text")
        return self._sample([{"prompt": p} for p in prompts], n, max_new_tokens, temperature, top_p, stop, seed,
                            seeds)

    def generate(self, prompt_ids: list[list[int]], n=1, max_new_tokens=256, temperature=1.0, top_p=1.0,
                 stop=None, seed=None, seeds=None) -> list[list[Generation]]:
        """The engine protocol: token-id prompts, sent as token arrays to ``/completions``."""
        self._need("completions", "generate")
        return self._sample([{"prompt": list(p)} for p in prompt_ids], n, max_new_tokens, temperature, top_p,
                            stop, seed, seeds)

    def close(self):
        self.client.close()

    # ---------------------------------------------------------------------------- internals

    def _need(self, endpoint: str, method: str):
        if self.endpoint != endpoint:
            raise ValueError(f"openai engine: {method} needs endpoint '{endpoint}', this one uses '{self.endpoint}'")

    def _jobs(self, requests, n, seed, seeds) -> list[tuple[dict, int, object]]:
        """``(request, samples, seed_of(got, round))`` per request to make (see the module's Seeds)."""
        if seeds is None:
            return [(r, n, lambda got, rd, i=i: None if seed is None else seed + i + 1_000_003 * rd)
                    for i, r in enumerate(requests)]
        if len(seeds) != len(requests) * n:
            raise ValueError(f"seeds: one per sample ({len(requests) * n}), got {len(seeds)}")
        if self.seed_per_sample:
            return [(r, 1, lambda got, rd, s=seeds[i * n + j]: derive_seed(s, rd) if rd else s)
                    for i, r in enumerate(requests) for j in range(n)]
        return [(r, n, lambda got, rd, i=i: derive_seed(*seeds[i * n + got:(i + 1) * n]))
                for i, r in enumerate(requests)]

    def _sample(self, requests, n, max_new_tokens, temperature, top_p, stop, seed, seeds=None):
        params = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        if stop:
            params["stop"] = list(stop)
        if self.logprobs:
            params["logprobs"] = True if self.endpoint == "chat" else 1
        if self.extra_body:
            params["extra_body"] = self.extra_body
        jobs = self._jobs(requests, n, seed, seeds)

        def one(job):
            request, k, seed_of = job
            gens, round_ = [], 0
            while len(gens) < k:  # a server may return fewer choices than asked
                kw = {**request, **params, "n": k - len(gens)}
                s = seed_of(len(gens), round_)
                if s is not None:
                    kw["seed"] = s
                choices = self._create(**kw)
                gens += [self._generation(c) for c in choices[:k - len(gens)]]
                round_ += 1
            return gens

        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(jobs)))) as pool:
            got = list(pool.map(one, jobs))
        if len(jobs) == len(requests):
            return got
        return [[g for gs in got[i * n:(i + 1) * n] for g in gs] for i in range(len(requests))]

    def _create(self, **kw):
        """One request; the reply's choices (never empty). A reply without choices, or whose body is
        not JSON, is asked again (see the module's docstring)."""
        import openai

        create = self.client.chat.completions.create if self.endpoint == "chat" else self.client.completions.create
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                reply = create(model=self.model, **kw)
            except openai.APIStatusError as e:  # after the client's retries, if it retries this status
                hint = f" (is ${self.api_key_env} set?)" if e.status_code in (401, 403) else ""
                raise self._failed(requests_made(e), f"HTTP {e.status_code}{hint}: {e}") from None
            except openai.APIConnectionError as e:  # timeouts included; after the client's retries
                raise self._failed(requests_made(e), f"{type(e).__name__}: {e}") from None
            except json.JSONDecodeError as e:
                last = f"the reply is not JSON ({e.msg})"
                continue
            choices = getattr(reply, "choices", None)  # an HTML page or a JSON list is no completion
            if isinstance(choices, list) and choices:
                return sorted(choices, key=lambda c: c.index or 0)
            last = "the reply had no choices"
        raise self._failed(self.max_retries + 1, last)

    def _failed(self, attempts: int, last: str) -> EngineError:
        """The one-line error of a request that got no answer after ``attempts`` HTTP requests."""
        if attempts == 1:
            return EngineError(f"{self.client.base_url}: {last}"[:800])
        return EngineError(f"{self.client.base_url}: no answer after {attempts} attempts; last: {last}"[:800])

    def _generation(self, choice) -> Generation:
        lp = getattr(choice, "logprobs", None)
        if self.endpoint == "chat":
            text = choice.message.content or ""
            tokens = [t.token for t in lp.content] if lp and lp.content else []
            logprobs = [t.logprob for t in lp.content] if lp and lp.content else []
        else:
            text = choice.text or ""
            tokens = list(lp.tokens or []) if lp else []
            logprobs = [x for x in (lp.token_logprobs or []) if x is not None] if lp else []
        ids = [int(t[9:]) for t in tokens] if tokens and all(t.startswith("token_id:") for t in tokens) else []
        return Generation(response_ids=ids, logprobs=logprobs, text=text,
                          finish_reason="length" if choice.finish_reason == "length" else "stop")

"""The LLM judge: an OpenAI-compatible chat model scores a response against a rubric.

The model must reply with a JSON object ``{"score": <0..1>, "critique": "<text>"}`` (a fenced
block or surrounding prose is tolerated). The ``openai`` client retries a timeout, a connection
error and HTTP 408/409/429 or 5xx itself, at most ``max_retries`` times with its own backoff; other
HTTP errors are not retried. What the client does not retry, an HTTP 200 reply that is malformed
(no choices, not JSON, a score missing or out of range), is asked again here, at most
``max_retries`` more times, after ``backoff_s`` (doubling). When the retries run out the verdict
is ``judge_error`` (score NaN: excluded from statistics and updates, never a 0). ``concurrency``
bounds the requests in flight. The API key is read from the environment variable named by
``api_key_env``.
"""
from __future__ import annotations

import json
import os
import re
import time

from agentopd.inference.openai import requests_made
from agentopd.judges.base import BaseJudge, judge_error
from agentopd.types import Judgement, Problem, Verdict

DEFAULT_RUBRIC = """You are grading an answer to a task.

Task:
{prompt}

Answer:
{response}
{reference_block}
Grade the answer for correctness and completeness. Reply with only a JSON object:
{{"score": <a number from 0 to 1>, "critique": "<what is wrong or missing, briefly; empty if nothing>"}}"""


class MalformedReply(ValueError):
    pass


def parse_reply(text: str | None) -> tuple[float, str]:
    """(score, critique) from the model's reply; MalformedReply if it is not a valid object."""
    if not text:
        raise MalformedReply("empty reply")
    m = re.search(r"\{.*\}", text, re.DOTALL)
    if not m:
        raise MalformedReply(f"no JSON object in reply: {text[:200]!r}")
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError as e:
        raise MalformedReply(f"reply is not valid JSON ({e.msg}): {text[:200]!r}") from None
    score = obj.get("score") if isinstance(obj, dict) else None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
        raise MalformedReply(f"'score' must be a number in [0, 1], got {score!r}")
    critique = obj.get("critique", "")
    if not isinstance(critique, str):
        raise MalformedReply("'critique' must be a string")
    return float(score), critique


class LLMJudge(BaseJudge):
    name = "llm"

    def __init__(self, model: str = "gpt-4o-mini", base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 rubric: str = DEFAULT_RUBRIC, system: str | None = None, timeout_s: float = 60.0,
                 max_retries: int = 3, backoff_s: float = 1.0, concurrency: int = 8, temperature: float = 0.0,
                 max_tokens: int = 512, pass_threshold: float = 1.0, reveal_reference: bool = False):
        try:
            from openai import OpenAI
        except ImportError:
            raise ImportError("the llm judge needs the openai client: pip install 'agentopd[llm]'") from None
        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY",
                             timeout=timeout_s, max_retries=max_retries)
        self.model, self.rubric, self.system = model, rubric, system
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.workers = concurrency
        self.temperature, self.max_tokens = temperature, max_tokens
        self.pass_threshold = pass_threshold
        self.reveal_reference = reveal_reference

    def _messages(self, problem: Problem, response: str) -> list[dict]:
        ref = problem.payload.get("answer") or problem.privileged.get("solution")
        block = f"\nReference answer (for grading only):\n{ref}\n" if self.reveal_reference and ref else ""
        user = self.rubric.format(prompt=problem.prompt, response=response, reference_block=block)
        return ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": user}]

    def _ask(self, messages) -> tuple[float, str]:
        """One request: (score, critique), or an exception for a reply of any other shape."""
        r = self.client.chat.completions.create(model=self.model, messages=messages,
                                                temperature=self.temperature, max_tokens=self.max_tokens)
        choices = getattr(r, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise MalformedReply(f"not a chat completion (no choices): {str(r)[:200]!r}")
        message = getattr(choices[0], "message", None)
        return parse_reply(getattr(message, "content", None) if message is not None else None)

    def judge(self, problem: Problem, response: str) -> Judgement:
        import openai

        messages = self._messages(problem, response)
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                score, critique = self._ask(messages)
            except (openai.APIStatusError, openai.APIConnectionError) as e:  # after the client's retries
                return self._failed(requests_made(e), f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 -- an HTTP 200 that is an HTML page, bad JSON, null fields
                last = f"{type(e).__name__}: {e}"
                continue
            ok = score >= self.pass_threshold
            return Judgement(Verdict(score, int(ok), 1, "ok" if ok else "wrong_answer"), critique)
        return self._failed(self.max_retries + 1, last)

    def _failed(self, attempts: int, last: str) -> Judgement:
        """The judge_error verdict of a sample that got no usable reply after ``attempts`` requests."""
        after = f" after {attempts} attempts" if attempts > 1 else ""
        return judge_error(f"llm judge ({self.model} at {self.client.base_url}) failed{after}: {last[:500]}")

    def close(self):
        self.client.close()

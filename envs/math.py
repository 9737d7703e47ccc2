"""``agentopd/Math-v0``: math problems judged by math-verify (see :mod:`agentopd.envs.base` for the
episode). Problems come from a JSONL file, a ``datasets`` dataset (column names configurable), a
list of rows, or the built-in generator (``problems="arithmetic"``, with ``levels``/``n``/``seed``).
"""
from __future__ import annotations

from agentopd.envs.base import JudgedEnv
from agentopd.envs.data import load_math_problems
from agentopd.envs.procedural import arithmetic_problems


class MathEnv(JudgedEnv):
    def __init__(self, problems="arithmetic", max_turns: int = 1, judge=None, question_key: str = "question",
                 answer_key: str = "answer", reveal_answer: bool = False, timeout_s: float = 5.0,
                 n: int = 1000, levels=(1, 2, 3, 4, 5), seed: int = 0, max_length: int = 1 << 20,
                 render_mode: str | None = None):
        """``problems``: "arithmetic" (generated: ``n``, ``levels``, ``seed``), a JSONL path, a
        dataset or rows. ``reveal_answer``: the critique may state the expected answer."""
        if isinstance(problems, str) and problems == "arithmetic":
            problems = arithmetic_problems(n, tuple(levels), seed)
        else:
            problems = load_math_problems(problems, question_key, answer_key)
        if judge is None:
            from agentopd.judges.math import MathJudge

            judge = MathJudge(reveal_answer=reveal_answer, timeout_s=timeout_s)
        super().__init__(problems, judge, max_turns, max_length, render_mode)

"""``agentopd/Math-v0``: math problems judged by math-verify (see :mod:`agentopd.envs.base` for the
episode). Problems come from a JSONL file, a ``datasets`` dataset (column names configurable), a
list of rows, or a built-in generator (``problems="arithmetic"`` or ``"micro"``, with
``levels``/``n``/``seed``/``split``/``heldout_n``).
"""
from __future__ import annotations

from functools import partial
from typing import Literal

from agentopd.envs.base import JudgedEnv, JudgedVectorEnv
from agentopd.envs.data import load_math_problems
from agentopd.envs.procedural import problem_set


class MathEnv(JudgedEnv):
    def __init__(self, problems="arithmetic", max_turns: int = 1, judge=None, question_key: str = "question",
                 answer_key: str = "answer", reveal_answer: bool = False, timeout_s: float = 5.0,
                 n: int = 1000, levels: tuple[int, ...] = (1, 2, 3, 4, 5), seed: int = 0, max_length: int = 1 << 20,
                 render_mode: str | None = None, split: Literal["train", "heldout"] = "train", heldout_n: int = 0,
                 solution_key: str | None = None):
        """``problems``: a generator ("arithmetic", "micro": ``n``, ``levels``, ``seed``, ``split``,
        ``heldout_n`` as in :func:`agentopd.envs.procedural.problem_set`), a JSONL path, a dataset or
        rows (columns ``question_key``, ``answer_key`` and ``solution_key``, see
        :func:`agentopd.envs.data.math_problem`). ``judge``: a judge or a judge spec (default: the
        math judge). ``reveal_answer``: the default judge's critique may state the expected answer."""
        load = partial(load_math_problems, question_key=question_key, answer_key=answer_key,
                       solution_key=solution_key)
        problems = problem_set(problems, "math", load, n, levels, seed, split, heldout_n)
        if judge is None or isinstance(judge, (str, dict)):
            from agentopd.judges import make_judge

            judge = make_judge(judge or {"name": "math", "reveal_answer": reveal_answer, "timeout_s": timeout_s})
        super().__init__(problems, judge, max_turns, max_length, render_mode)


def math_vector_env(num_envs: int = 1, **kw) -> JudgedVectorEnv:
    return JudgedVectorEnv(MathEnv(**kw), num_envs)

"""Judges: turn a (problem, response) into a Verdict and a critique.

Built-in: ``tests`` (run code against tests in a sandbox), ``math`` (math-verify equivalence),
``llm`` (an OpenAI-compatible chat model with a rubric), ``composite`` (weighted). Add your own
with :func:`register`, an import path ``package.module:Class``, or the ``agentopd.judges``
entry-point group.
"""
from agentopd.judges.base import (  # noqa: F401
    BaseJudge,
    Judge,
    available,
    judge_error,
    make_judge,
    register,
    resolve,
    reward_stats,
)

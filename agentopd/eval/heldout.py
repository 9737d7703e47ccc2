"""The held-out pass rate during training (and of the micro testbed): ``n`` episodes per held-out
problem at the sampling temperature through :func:`agentopd.rollout.rollout`, judge errors left out;
with several turns, also the pass rate after each turn."""
from __future__ import annotations

import math
import sys

from agentopd.config import SamplingConfig


def pass_after_turn(episodes: list, turns: int) -> list[float]:
    """The share of judged episodes solved by turn ``t`` for t = 1..turns (an episode that ended earlier
    keeps its last result); NaN when none could be judged."""
    judged = [e for e in episodes if not e.judge_error]
    if not judged:
        return [math.nan] * turns
    return [sum(e.success and len(e.turns) <= t for e in judged) / len(judged) for t in range(1, turns + 1)]


def heldout_eval(engine, tok, venv, problems: int, n: int, sampling: SamplingConfig, seed: int,
                 max_turns: int = 1, feedback: str | None = None) -> dict:
    """Play ``n`` episodes of each of the first ``problems`` problems of the vector env ``venv``
    (``problems * n`` slots): ``{"heldout_pass1", "heldout_judge_errors"}``, plus
    ``heldout_pass_after_turn`` when ``max_turns > 1``, and an agent env's tool use
    (``heldout_tool_calls_mean``, ``heldout_pass_rate_run_tests``, ... :func:`agentopd.envs.agent.tool_summary`).
    pass@1 is the final success rate."""
    from agentopd.rollout import DEFAULT_FEEDBACK, Sampling, rollout

    episodes = rollout(engine, tok, venv, group_size=n, seed=seed, max_turns=max_turns,
                       index=[i for i in range(problems) for _ in range(n)], feedback=feedback or DEFAULT_FEEDBACK,
                       sampling=Sampling(sampling.max_new_tokens, sampling.temperature, sampling.top_p))
    errors = sum(e.judge_error for e in episodes)
    if errors:
        print(f"held-out pass@1: {errors} of {len(episodes)} samples could not be judged (judge_error); left out",
              file=sys.stderr)
    from agentopd.envs.agent import episode_tool_metrics

    after = pass_after_turn(episodes, max_turns)
    out = {"heldout_pass1": after[-1], "heldout_judge_errors": errors,
           **{f"heldout_{k}": v for k, v in episode_tool_metrics(episodes).items()}}  # an agent env's tool use
    return out | ({"heldout_pass_after_turn": after} if max_turns > 1 else {})


def heldout_pass1(engine, tok, problems, judge, n: int, sampling: SamplingConfig, seed: int) -> float:
    """Held-out pass@1 of ``problems`` (a list) under ``judge``: the mean success of ``n`` samples per
    problem at the sampling temperature, over the judged samples. Judge errors (an outage, not a
    wrong answer) are left out and their count said on stderr; NaN when no sample could be judged."""
    from agentopd.envs.base import JudgedVectorEnv

    venv = JudgedVectorEnv.over(problems, judge, n)
    return heldout_eval(engine, tok, venv, len(problems), n, sampling, seed)["heldout_pass1"]

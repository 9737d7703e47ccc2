"""The held-out pass rate during training (and of the micro testbed): ``n`` samples per held-out
problem at the sampling temperature, judge errors left out."""
from __future__ import annotations

import math
import sys

from agentopd.config import SamplingConfig


def heldout_pass1(engine, tok, problems, judge, n: int, sampling: SamplingConfig, seed: int) -> float:
    """Held-out pass@1: the mean success of ``n`` samples per problem at the sampling temperature,
    over the judged samples. Judge errors (an outage, not a wrong answer) are left out and their
    count said on stderr; NaN when no sample could be judged."""
    return heldout_eval(engine, tok, problems, judge, n, sampling, seed)[0]


def heldout_eval(engine, tok, problems, judge, n: int, sampling: SamplingConfig, seed: int) -> tuple[float, int]:
    """(held-out pass@1 as :func:`heldout_pass1` gives it, the number of judge errors left out)."""
    from agentopd.inference.base import apply_chat

    gens = engine.generate([apply_chat(tok, [{"role": "user", "content": p.prompt}]) for p in problems], n=n,
                           max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                           top_p=sampling.top_p, seed=seed)
    verdicts = judge.judge_many([(p, g.text) for p, gs in zip(problems, gens) for g in gs])
    judged = [j.verdict.status for j in verdicts if j.verdict.status != "judge_error"]
    if len(judged) < len(verdicts):
        print(f"held-out pass@1: {len(verdicts) - len(judged)} of {len(verdicts)} samples could not be judged "
              "(judge_error); left out", file=sys.stderr)
    return (sum(s == "ok" for s in judged) / len(judged) if judged else math.nan), len(verdicts) - len(judged)

"""The one rollout loop (and, for now, the training problems and judge a config names)."""
from __future__ import annotations


def problems_and_judge(cfg):
    """(training problems, held-out problems or None, judge)."""
    from agentopd.envs.data import (
        load_code_problems,
        load_humaneval,
        load_math_problems,
    )
    from agentopd.envs.procedural import GENERATORS, HELDOUT_SEED, generated_problems
    from agentopd.judges import make_judge

    if cfg.data.env not in ("math", "code"):
        raise ValueError(f"data.env must be 'math' or 'code', got {cfg.data.env!r}")
    load = load_math_problems if cfg.data.env == "math" else load_code_problems
    heldout = None
    if cfg.data.problems in GENERATORS:
        if GENERATORS[cfg.data.problems] != cfg.data.env:
            raise ValueError(f"data.problems={cfg.data.problems!r} makes {GENERATORS[cfg.data.problems]} problems,"
                             f" but data.env is {cfg.data.env!r}")
        problems = generated_problems(cfg.data.problems, cfg.data.n, cfg.data.levels, cfg.run.seed + 1)
        if cfg.run.eval_problems and not cfg.data.heldout:
            heldout = generated_problems(cfg.data.problems, cfg.run.eval_problems, cfg.data.levels, HELDOUT_SEED)
            seen = {p.prompt for p in heldout}
            problems = [p for p in problems if p.prompt not in seen]
    elif cfg.data.problems == "humaneval":
        problems = load_humaneval()
    else:
        problems = load(cfg.data.problems)
    if cfg.run.eval_problems and heldout is None:
        if not cfg.data.heldout:
            raise ValueError("run.eval_problems needs data.heldout (a JSONL file) for non-generated problems")
        heldout = load(cfg.data.heldout)[:cfg.run.eval_problems]
    judge = make_judge(cfg.data.judge or ("math" if cfg.data.env == "math" else "tests"))
    return problems, heldout, judge

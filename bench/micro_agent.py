"""Does the micro agent learn to use a tool? ``configs/micro-agent.yaml`` (agentopd/CodeAgent-v0 on the
micro code setting: run_tests(code) runs the prompt's examples, the final answer is judged on them and
two hidden tests) trained from the micro agent warm start (``model.path: micro-agent``), one arm per
objective, the settings fixed here before any run:

- ``grpo``: GRPO on the episode reward (the config as shipped);
- ``hybrid``: GRPO + the self-teacher (sd_token, lambda 1, clamp 5, centred), which re-scores every
  assistant turn in its conversation with the final verdict and critique, a successful sibling's
  final answer and the reference solution in context;
- ``sd_token``: the self-teacher alone;
- ``hybrid_noref``: ``hybrid`` with a teacher shown the final critique and a successful sibling but not
  the reference solution.

``--setting``: what run_tests runs (``SETTINGS``).

Each arm: ``--steps`` steps (8 problems x 4 episodes each), seed ``--seed``; held-out evaluation (60
unseen problems x 2 episodes at temperature 1, the same seed each time) before training and every
``--eval-every`` steps. Reported per arm: held-out pass@1 before and after, tool calls per episode, the
share of episodes that ran the tests and the pass rate of those that did and did not; per step the
training rows' pass rate, ``tool_calls_mean`` and ``tool_errors``. Writes
``bench/results/micro_agent_<arm>.json``.

    OMP_NUM_THREADS=1 python3 bench/micro_agent.py --arm grpo
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

ROOT = os.path.join(os.path.dirname(__file__), "..")
ARMS = {"grpo": [],
        "hybrid": ["algo.advantage=hybrid", "algo.advantage_kwargs={mode: sum, lam: 1.0, clamp: 5.0, center: true}"],
        "sd_token": ["algo.advantage=sd_token", "algo.advantage_kwargs={clamp: 5.0, center: true}"]}
ARMS["hybrid_noref"] = [*ARMS["hybrid"], "teacher.context=[feedback, demonstration]"]
SETTINGS = {"public": [], "all": ["env.kwargs.run_tests_on=all"]}
"""``public``: run_tests runs the public tests (the prompt's three examples); ``all``: every test, the
two hidden ones that decide ambiguous examples included (the agent is given the suite that judges it)."""
HELD = ("pass1", "tool_calls_mean", "tool_errors", "turns_per_episode", "run_tests_frac", "pass_rate_run_tests",
        "pass_rate_no_run_tests")
STEP = ("pass_rate", "reward_mean", "tool_calls_mean", "tool_errors", "run_tests_frac", "turns_mean",
        "teacher_signal_frac", "time_generate", "time_execute_total", "time_update")


def run_arm(arm: str, steps: int, seed: int, every: int, setting: str = "public", model: str = "") -> dict:
    from agentopd.config import load
    from agentopd.train import train

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        cfg = load(os.path.join(ROOT, "configs", "micro-agent.yaml"),
                   [f"run.out={out}", f"run.steps={steps}", f"run.seed={seed}", f"eval.every={every}",
                    "run.progress=false", *SETTINGS[setting], *ARMS[arm], *([f"model.path={model}"] if model else [])])
        rows = train(cfg)
    evals = [r for r in rows if "heldout_pass1" in r]
    held = [{"step": r["step"], **{k: r.get(f"heldout_{k}") for k in HELD}} for r in evals]
    return {"arm": arm, "setting": setting, "model": model or "micro-agent", "overrides": SETTINGS[setting] + ARMS[arm],
            "steps": steps, "seed": seed, "config": "configs/micro-agent.yaml",
            "heldout_before": held[0], "heldout_after": held[-1], "heldout": held,
            "train": [{"step": r["step"], **{k: r.get(k) for k in STEP}} for r in rows if "loss" in r],
            "seconds": time.perf_counter() - t0, "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", choices=sorted(ARMS), required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="public")
    ap.add_argument("--model", default="", help="a warm start other than micro-agent (bench/micro_agent_build.py OUT)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    result = run_arm(a.arm, a.steps, a.seed, a.eval_every, a.setting, a.model)
    tag = "" if a.setting == "public" else f"{a.setting}_"
    out = a.out or os.path.join(ROOT, "bench", "results", f"micro_agent_{tag}{a.arm}.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    b, e = result["heldout_before"], result["heldout_after"]
    print(f"{a.arm}: held-out pass@1 {b['pass1']:.3f} -> {e['pass1']:.3f}; tool calls/episode "
          f"{b['tool_calls_mean']:.2f} -> {e['tool_calls_mean']:.2f}; {result['seconds']:.0f} s -> {out}")


if __name__ == "__main__":
    main()

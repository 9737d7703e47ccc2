"""Sample efficiency on the micro tasks, for every kind of teacher: GRPO, the self-teacher from
critiques (the reference SDPO objective, sd_token, hybrid), on-policy distillation from a stronger
teacher model (``opd``: the shipped micro teacher, plain prompt) and from the self-teacher shown the
reference solution (``opsd``), on the same rollout budget, for code (functions from examples, judged
by sandboxed tests) or math (column arithmetic, judged by math-verify with critiques that name the
expected answer).

Every run starts from the same warm-start checkpoint (``agentopd micro pretrain``; created first when
missing) and trains with the method's config (``METHODS``, each at its own setting: the distillation
arms sample one answer per prompt, the others a group) and the setting's data (``SETTINGS``); only
the method and the seed differ. A rollout is one sampled answer, whatever the grouping, and every
method gets the same number (``--budget``). The in-context RLEF baseline (no gradient: the critique
goes back into the conversation) runs once on the same model and held-out problems, as a line. The
held-out pass@1 (unseen problems, ``n`` samples each at the sampling temperature) is measured before
training, after every step up to ``--dense`` rollouts, then every ``--eval-every`` rollouts; each
teacher model's own pass@1 on the same problems is measured too (OPD's ceiling). The budgets and
the target are fixed by the arguments below, before any result is seen:

    target = warm-start pass@1 + --target-gain        (absolute; default +0.10 on code, +0.05 on math,
                                                       whose warm start is at 0.835)

Reported per method: rollouts to reach the target (mean and spread over the seeds that reach it; a
seed that never does counts as not reached), the rollouts from which every later evaluation stays at
or above it (``rollouts_to_stay``: a first crossing can be noise), final pass@1 (at the same budget:
equal rollouts), and the ratio of each method's rollouts to GRPO's. Writes ``<out>.json``, ``<out>.svg`` (a learning curve
per method, mean ± std over seeds, drawn by ``agentopd.report.line_chart_svg``, the report's chart
code) and the PNG of it (``docs/``; by headless Chromium, else matplotlib).

    python3 bench/sample_efficiency.py --quick --setting code   # 3 seeds per method, the small budget
    python3 bench/sample_efficiency.py --setting math            # the full budget
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

METHODS = {"grpo": "micro-grpo.yaml", "sdpo": "micro-sdpo-ref.yaml", "sd_token": "micro-sdpo.yaml",
           "hybrid": "micro-hybrid.yaml", "opd": "micro-opd.yaml", "opsd": "micro-opsd.yaml"}
"""Each method at its own setting (its config): the distillation arms sample one answer per prompt
(no group baseline to form), GRPO and the self-distillation arms a group of 4."""
SETTINGS = {
    "code": ["env.id=agentopd/Code-v0", "env.kwargs.problems=functions", "env.kwargs.judge={}"],
    "math": ["env.id=agentopd/Math-v0", "env.kwargs.problems=micro", "env.kwargs.levels=[1, 2, 3]",
             "env.kwargs.judge={name: math, reveal_answer: true}", "optim.lr=3e-5"],
}
"""The data of each setting, as overrides of the method configs (the shipped configs are code). Math
trains every method at lr 3e-5: the warm start already solves 0.835 of it, so a step's gradient is
almost all noise (the pairwise cosine of batch gradients 0.002, against 0.105 on code), and at lr 1e-4
Adam's full-size steps on that noise wore the model down under every method (0.835 -> 0.77-0.79)."""


def _config(method: str, seed: int, args, *more: str):
    from agentopd.config import load

    overrides = [f"run.seed={seed}", "run.progress=false", "run.checkpoint_every=0",
                 f"eval.problems={args.eval_problems}", f"eval.samples={args.eval_samples}",
                 f"model.path={args.model}", *SETTINGS[args.setting], *more]
    return load(os.path.join(args.configs, METHODS[method]), overrides)


def run_one(method: str, seed: int, args) -> list[tuple[int, float]]:
    """[(rollouts, held-out pass@1)] for one training run, the first point at 0 rollouts: the same
    rollout budget for every method (steps = budget / the method's rollouts per step), held-out
    pass@1 after every step up to ``--dense`` rollouts, then every ``--eval-every`` rollouts."""
    from agentopd.train import train

    probe = _config(method, seed, args)
    per_step = probe.sampling.prompts_per_step * probe.sampling.group_size
    with tempfile.TemporaryDirectory() as out:
        cfg = _config(method, seed, args, f"run.steps={args.budget // per_step}",
                      f"eval.every={max(args.eval_every // per_step, 1)}",
                      f"eval.dense_steps={args.dense // per_step}", f"run.out={out}")
        rows = train(cfg)
    return [(r["step"] * per_step, r["heldout_pass1"]) for r in rows if "heldout_pass1" in r]


def teacher_pass1(args) -> dict[str, float]:
    """The held-out pass@1 of each separate teacher model a method distils from (OPD's ceiling),
    measured as training measures the student: the same problems, samples and seed."""
    from agentopd.envs.procedural import HELDOUT_SEED
    from agentopd.eval.heldout import heldout_pass1
    from agentopd.inference import load_pretrained
    from agentopd.inference.hf import HFEngine
    from agentopd.judges import make_judge
    from agentopd.testbed.micro import heldout_problems

    out = {}
    for method in args.methods.split(","):
        cfg = _config(method, 0, args)
        if not cfg.teacher.model or cfg.teacher.model in out:
            continue
        model, tok = load_pretrained(cfg.teacher.model)
        judge = make_judge("math" if args.setting == "math" else "tests")
        try:
            out[cfg.teacher.model] = heldout_pass1(HFEngine(model.eval(), tok), tok,
                                                   heldout_problems(args.setting, args.eval_problems), judge,
                                                   args.eval_samples, cfg.sampling, HELDOUT_SEED)
        finally:
            judge.close()
    return out


def rlef_line(args) -> list[float]:
    """The in-context RLEF baseline on the same model and held-out problems: the held-out pass rate
    after each of 3 turns (the critique of the public tests, or the math judge's, between turns)."""
    from agentopd.envs.procedural import HELDOUT_SEED

    from agentopd.config import load
    from agentopd.eval.rlef import rlef

    data = [o for o in SETTINGS[args.setting] if o.startswith(("env.id", "env.kwargs.problems", "env.kwargs.levels"))]
    with tempfile.TemporaryDirectory() as out:  # the default judges; the held-out problems, sampled from their seed
        cfg = load(os.path.join(args.configs, "micro-rlef.yaml"),
                   [f"model.path={args.model}", f"env.kwargs.n={args.eval_problems}", f"eval.samples={args.eval_samples}",
                    f"env.kwargs.seed={HELDOUT_SEED}", f"run.seed={HELDOUT_SEED}", "env.max_turns=3",
                    "env.feedback='{critique}'", f"run.out={out}", "eval.k=[1]", "run.resume=false", *data])
        return rlef(cfg)["pass_after_turn"]


def rollouts_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((n for n, p in curve if p >= target - 1e-9), None)  # 0.315 + 0.10 is 0.41500000000000004


def rollouts_to_stay(curve: list[tuple[int, float]], target: float) -> int | None:
    """The rollouts from which every later evaluation is at or above the target (None: never)."""
    return next((n for i, (n, _) in enumerate(curve) if all(p >= target - 1e-9 for _, p in curve[i:])), None)


def summarise(curves: dict[str, list[list[tuple[int, float]]]], target: float) -> dict:
    out = {}
    for method, runs in curves.items():
        reach = [rollouts_to(c, target) for c in runs]
        got = [n for n in reach if n is not None]
        finals = [c[-1][1] for c in runs]
        stay = [rollouts_to_stay(c, target) for c in runs]
        out[method] = {"rollouts_to_target": reach,
                       "rollouts_to_stay": stay,
                       "stay_mean": statistics.mean(stay) if None not in stay else None,
                       "reached": f"{len(got)}/{len(runs)}",
                       "rollouts_mean": statistics.mean(got) if got else None,
                       "rollouts_std": statistics.pstdev(got) if len(got) > 1 else 0.0 if got else None,
                       "final_mean": statistics.mean(finals),
                       "final_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0}
    base = out.get("grpo", {}).get("rollouts_mean")
    for m in out.values():
        m["rollouts_vs_grpo"] = m["rollouts_mean"] / base if base and m["rollouts_mean"] is not None else None
    return out


def _mean_std(runs: list[list[tuple[int, float]]]) -> list[tuple[int, float, float]]:
    """(rollouts, mean, std over seeds) at each evaluation point."""
    return [(pts[0][0], statistics.mean(p for _, p in pts), statistics.pstdev(p for _, p in pts))
            for pts in zip(*runs)]


def _ref_lines(target: float, rlef_pass: list[float] | None) -> list[tuple[str, float]]:
    lines = [("target", target)]
    return lines + [(f"RLEF in context, {t} turn(s)", rlef_pass[t - 1]) for t in (1, 3) if rlef_pass and len(rlef_pass) >= t]


def _plot_matplotlib(curves, lines: list[tuple[str, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, runs in curves.items():
        x, m, sd = zip(*_mean_std(runs))
        ax.plot(x, m, label=method)
        ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.2)
    for (label, y), ls in zip(lines, ("--", ":", "-.")):
        ax.axhline(y, color="gray" if label == "target" else "black", ls=ls, lw=1, label=label)
    ax.set_xlabel("rollouts")
    ax.set_ylabel("held-out pass@1")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(curves, target: float, svg: str, png: str, setting: str, rlef_pass: list[float] | None = None) -> list[str]:
    """A learning curve per method (mean ± std over seeds) and the reference lines, drawn by
    ``agentopd.report.line_chart_svg`` to ``svg``; ``png`` rendered from it by headless Chromium,
    else by matplotlib, else skipped. Returns the paths written."""
    from agentopd.report import line_chart_svg, png_from_svg

    title = f"micro {setting}: held-out pass@1 vs rollouts (mean ± std over seeds)"
    lines = _ref_lines(target, rlef_pass)
    w, h = 720, 480
    with open(svg, "w", encoding="utf-8") as f:
        f.write(line_chart_svg({m: _mean_std(runs) for m, runs in curves.items()}, hlines=lines, title=title,
                               xlabel="rollouts", ylabel="held-out pass@1", width=w, height=h, legend=True))
    if png_from_svg(svg, png, w, h):
        return [svg, png]
    try:
        _plot_matplotlib(curves, lines, png, title)
        return [svg, png]
    except ImportError:
        print(f"no {png}: neither chromium nor matplotlib (apt-get install chromium, or pip install matplotlib)")
        return [svg]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small budget")
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="code")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1 "
                    "(pilot runs that choose settings use other seeds than the reported ones)")
    ap.add_argument("--no-rlef", action="store_true", help="skip the in-context RLEF line")
    ap.add_argument("--budget", type=int, help="rollouts (sampled answers) per run (default: 1280 quick, 3840 full)")
    ap.add_argument("--eval-every", type=int, help="rollouts between held-out evaluations after --dense "
                    "(default: 160 quick, 320 full)")
    ap.add_argument("--dense", type=int, help="evaluate after every step up to this many rollouts "
                    "(default: 320 quick, 640 full)")
    ap.add_argument("--eval-problems", type=int, default=100)
    ap.add_argument("--eval-samples", type=int, default=2)
    ap.add_argument("--target-gain", type=float, help="target = warm-start pass@1 + this (default: 0.10 code, "
                    "0.05 math)")
    ap.add_argument("--model", default="micro", help="warm-start checkpoint ('micro': the default one)")
    ap.add_argument("--configs", default=os.path.join(os.path.dirname(__file__), "..", "configs"))
    ap.add_argument("--out", help="output path without extension (default: "
                    "bench/results/sample_efficiency_<setting>[_quick]; the PNG also goes to docs/)")
    args = ap.parse_args()
    bad = [m for m in args.methods.split(",") if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    name = f"sample_efficiency_{args.setting}" + ("_quick" if args.quick else "")
    ap_out = args.out
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", name)
    args.target_gain = args.target_gain if args.target_gain is not None else {"code": 0.10, "math": 0.05}[args.setting]
    args.budget = args.budget or (1280 if args.quick else 3840)
    args.eval_every = args.eval_every or (160 if args.quick else 320)
    args.dense = args.dense or (320 if args.quick else 640)

    from agentopd.testbed import micro

    if args.model == "micro":
        micro.ensure()
    t0 = time.perf_counter()
    teachers = teacher_pass1(args)
    for path, p1 in teachers.items():
        print(f"teacher {path}: held-out pass@1 {p1:.3f}", flush=True)
    curves: dict[str, list] = {}
    for method in args.methods.split(","):
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            t = time.perf_counter()
            curve = run_one(method, seed, args)
            curves.setdefault(method, []).append(curve)
            print(f"{method:9s} seed {seed}: pass@1 {curve[0][1]:.3f} -> {curve[-1][1]:.3f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    rlef_pass = None if args.no_rlef else rlef_line(args)
    print(f"RLEF in context: held-out pass rate after turns 1..3: {rlef_pass}", flush=True)
    start = statistics.mean(c[0][1] for runs in curves.values() for c in runs)
    target = start + args.target_gain
    summary = summarise(curves, target)
    print(f"\nwarm start pass@1 {start:.3f}; target {target:.3f}; budget {args.budget} rollouts per run; "
          f"{time.perf_counter() - t0:.0f} s in all\n")
    print(f"{'method':10s} {'reached':>8s} {'rollouts to target':>22s} {'vs grpo':>8s} {'stays above from':>17s} "
          f"{'final pass@1':>16s}")
    for method, s in summary.items():
        r = "-" if s["rollouts_mean"] is None else f"{s['rollouts_mean']:.0f} ± {s['rollouts_std']:.0f}"
        v = "-" if s["rollouts_vs_grpo"] is None else f"{s['rollouts_vs_grpo']:.2f}x"
        st = "-" if s["stay_mean"] is None else f"{s['stay_mean']:.0f}"
        print(f"{method:10s} {s['reached']:>8s} {r:>22s} {v:>8s} {st:>17s} {s['final_mean']:>9.3f} ± {s['final_std']:.3f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "warm_start": start, "target": target, "curves": curves,
                   "summary": summary, "teacher_pass1": teachers, "rlef_pass_after_turn": rlef_pass}, f, indent=2)
    png = os.path.join(os.path.dirname(__file__), "..", "docs", name + ".png") if not ap_out else args.out + ".png"
    written = plot(curves, target, args.out + ".svg", png, args.setting, rlef_pass)
    print(f"\nwrote {args.out}.json, " + " and ".join(written))


if __name__ == "__main__":
    main()

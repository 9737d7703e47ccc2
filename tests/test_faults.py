"""The faults a long run meets, each against the real component (tests/fault_parts.py): stop signals
to a real ``agentopd train`` process (and to one rank under torchrun), a real small tmpfs (or a
file-size limit where mounting is not allowed), non-finite numbers injected, a run forced to
collapse, a real Docker engine stopped and started, real loopback servers killed or slowed, and a
competing process while programs are judged and a run trains. Each ends in one line and an exit
status, never a traceback; a stopped run resumes to exactly the parameters and metrics of a run
that was never stopped. No test waits on a timing: gates hold a step until the test has acted."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_parts import (
    WAIT_S,
    At,
    Collapsing,
    GateJudge,
    NaNJudge,
    PrivateDocker,
    Programs,
    agentopd,
    gate,
    grow,
    server_process,
    sigterm_one_rank,
    small_disk,
    train_process,
    wait_for,
)

from agentopd import faults
from agentopd.config import load
from agentopd.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["run.progress=false", "model.path=tiny", "env.id=agentopd/Math-v0", "env.kwargs.problems=arithmetic",
        "env.kwargs.levels=[1,2]", "eval.problems=0", "sampling.prompts_per_step=2", "sampling.group_size=3",
        "sampling.max_new_tokens=12", "run.retry_backoff_s=0.1"]


def _cfg(out, *overrides):
    return load(str(ROOT / "configs" / "micro-sdpo.yaml"), [f"run.out={out}", *TINY, *overrides])


def _params(out, step: int | None = None) -> dict:
    from safetensors.torch import load_file

    from agentopd.rl.checkpoints import checkpoints

    d = Path(out, "checkpoints", f"step-{step}") if step else Path(checkpoints(str(Path(out, "checkpoints")))[0])
    return load_file(d / "model.safetensors")


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]


def _finish(p: subprocess.Popen, log: Path | None = None) -> tuple[int, str]:
    out, _ = p.communicate(timeout=WAIT_S)
    return p.returncode, log.read_text() if log else out


def _said(text: str) -> list[str]:
    """agentopd's own lines (what the command says besides warnings and progress)."""
    return [x for x in text.splitlines() if x.startswith("agentopd:")]


def _same_run(a, b) -> None:
    """Two runs' newest checkpoints hold the same parameters, and their metrics rows the same numbers."""
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        keep = [k for k in x if not k.startswith("time_") and k != "tokens_per_s"]
        assert {k: x[k] for k in keep} == {k: y[k] for k in keep}, x["step"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A 4-step run that was never stopped (its own process, one torch thread)."""
    out = tmp_path_factory.mktemp("straight")
    code, text = _finish(train_process(out, "run.steps=4", "run.checkpoint_every=2"))
    assert code == 0, text[-3000:]
    return out


# ---------------------------------------------------------------------------------- 1. stop signals


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_the_resumed_run_is_exact(tmp_path, straight):
    out, g, log = tmp_path / "run", tmp_path / "gate", tmp_path / "log"
    p = train_process(out, "run.steps=4", "run.checkpoint_every=0", "run.stop_grace_s=600", gate(g, at=3), stderr=log)
    wait_for((g / "ready").exists)  # step 3 is being judged
    p.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM: finishing the current step" in log.read_text())
    (g / "go").touch()
    code, text = _finish(p, log)
    assert code == faults.INTERRUPTED and "Traceback" not in text, text[-3000:]
    assert _said(text)[-1] == (f"agentopd: stopped by SIGTERM after step 3; checkpoint {out}/checkpoints/step-3 holds "
                               "step 3; run.resume=true continues from it")
    assert os.listdir(out / "checkpoints") == ["step-3"] and [r["step"] for r in _rows(out)] == [1, 2, 3]
    code, text = _finish(train_process(out, "run.steps=4", "run.checkpoint_every=0", "run.resume=true", gate(g)))
    assert code == 0, text[-3000:]
    _same_run(out, straight)  # 0 completed steps lost, and the same parameters and metrics


def test_a_step_the_grace_would_not_cover_is_abandoned_and_redone_on_resume(tmp_path, straight):
    out, g, log = tmp_path / "run", tmp_path / "gate", tmp_path / "log"
    p = train_process(out, "run.steps=4", "run.checkpoint_every=0", "run.stop_grace_s=1", gate(g, at=3), stderr=log)
    wait_for((g / "ready").exists)
    p.send_signal(signal.SIGTERM)  # the gate stays shut: step 3 cannot end within the grace
    code, text = _finish(p, log)
    assert code == faults.INTERRUPTED and "Traceback" not in text, text[-3000:]
    assert "stopped by SIGTERM: step 3 abandoned (the grace of 1 s would have passed)" in _said(text)[-1]
    assert os.listdir(out / "checkpoints") == ["step-2"] and [r["step"] for r in _rows(out)] == [1, 2]
    (g / "go").touch()
    code, text = _finish(train_process(out, "run.steps=4", "run.checkpoint_every=0", "run.resume=true", gate(g)))
    assert code == 0, text[-3000:]
    _same_run(out, straight)


def test_a_second_signal_stops_at_once_and_leaves_the_last_checkpoint(tmp_path):
    out, g, log = tmp_path / "run", tmp_path / "gate", tmp_path / "log"
    p = train_process(out, "run.steps=4", "run.checkpoint_every=1", "run.stop_grace_s=600", gate(g, at=2), stderr=log)
    wait_for((g / "ready").exists)
    p.send_signal(signal.SIGINT)
    wait_for(lambda: "SIGINT: finishing the current step" in log.read_text())
    p.send_signal(signal.SIGINT)
    code, text = _finish(p, log)
    assert code == 128 + signal.SIGINT and "Traceback" not in text, text[-3000:]
    assert _said(text)[-1] == "agentopd: second SIGINT: stopped at once, without a checkpoint"
    assert os.listdir(out / "checkpoints") == ["step-1"]


def test_under_torchrun_every_rank_stops_after_the_same_step(tmp_path):
    """SIGTERM to rank 1 alone: both ranks finish step 2, agree, and stop; rank 0 writes step-2."""
    out, g = tmp_path / "run", tmp_path / "gate"
    sigterm_one_rank(out, g, tmp_path / "log", steps=4, at=2)
    text = (tmp_path / "log").read_text()
    assert "stopped by SIGTERM after step 2" in text and "stopped by a stop signal on another rank after step 2" in text
    assert os.listdir(out / "checkpoints") == ["step-2"]
    assert [(g / f"calls-{r}").read_text().split() for r in (0, 1)] == [["1", "2"], ["1", "2"]]  # no rank began step 3


# ---------------------------------------------------------------------------------- 2. a full disk


@pytest.mark.parametrize("mode", ["tmpfs", "file-size limit"])
def test_a_full_disk_keeps_the_last_checkpoint_and_says_what_it_needs(tmp_path, straight, mode):
    """4 MB hold the step-2 checkpoint (2.4 MB) but not step 4's (or every file is capped at 1 MB,
    below the optimizer state's 1.2 MB): one line, exit 74, no partial files; it fails the same way
    until there is room, then resumes to the parameters of a run that never failed."""
    with small_disk(tmp_path / "disk", 4096 if mode == "tmpfs" else 1024, force_limit=mode != "tmpfs") as (disk, how, cap):
        if how != mode:
            pytest.skip(f"mounting a tmpfs is not allowed here ({how} instead)")
        out = disk / "run"
        code, text = _finish(train_process(out, "run.steps=2", "run.checkpoint_every=2"))
        assert code == 0, text[-3000:]
        for _ in range(2):  # the failed write leaves nothing behind: the second attempt fails as the first
            code, text = _finish(train_process(out, "run.steps=4", "run.checkpoint_every=2", "run.resume=true",
                                               preexec_fn=cap))
            assert code == faults.WRITE_FAILED and "Traceback" not in text, text[-3000:]
            assert _said(text)[-1].startswith(f"agentopd: cannot write checkpoint {out}/checkpoints/step-4: ")
            assert f"needed; the newest readable checkpoint is {out}/checkpoints/step-2" in _said(text)[-1]
            assert os.listdir(out / "checkpoints") == ["step-2"]
        if how == "tmpfs":
            assert "No space left on device" in _said(text)[-1] and "low disk space" in text  # the early warning
            grow(disk, 16384)
        code, text = _finish(train_process(out, "run.steps=4", "run.checkpoint_every=2", "run.resume=true"))
        assert code == 0, text[-3000:]
        _same_run(out, straight)


EVAL = {"model": {"path": "tiny"}, "engine": {"name": "hf"}, "sampling": {"max_new_tokens": 8},
        "env": {"id": "agentopd/Math-v0", "kwargs": {"problems": "arithmetic", "n": 40}},
        "eval": {"samples": 2, "chunk": 4}, "run": {"progress": False, "device": "cpu"}}


@pytest.mark.parametrize("mode", ["tmpfs", "file-size limit"])
def test_eval_results_on_a_full_disk_stop_whole_and_resume(tmp_path, mode):
    """``eval model`` whose results.jsonl outgrows 8 kB (a tmpfs, or a file-size limit): one line, exit
    74, the file holds whole rows only; with room, run.resume=true ends with the rows of a run that
    never failed."""
    import yaml

    from agentopd.jsonl import read

    def config(out):
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump({**EVAL, "run": {**EVAL["run"], "out": str(out)}}))
        return str(path)

    straight = tmp_path / "straight"
    assert agentopd("eval", "model", "--config", config(straight)).returncode == 0
    with small_disk(tmp_path / "disk", 8, force_limit=mode != "tmpfs") as (disk, how, cap):
        if how != mode:
            pytest.skip(f"mounting a tmpfs is not allowed here ({how} instead)")
        out = disk / "eval"
        r = agentopd("eval", "model", "--config", config(out), preexec_fn=cap)
        assert r.returncode == faults.WRITE_FAILED and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert _said(r.stderr)[-1].startswith("agentopd: cannot ") and str(out) in _said(r.stderr)[-1]
        kept = read(str(out / "results.jsonl"))  # whole rows only (a torn line would raise here)
        assert 0 < len(kept) < 80
        if how == "tmpfs":
            grow(disk, 1024)
        r = agentopd("eval", "model", "--config", config(out), "run.resume=true")
        assert r.returncode == 0, r.stderr[-3000:]
        key = lambda row: (row["task_id"], row["sample_index"])
        assert sorted(read(str(out / "results.jsonl")), key=key) == sorted(read(str(straight / "results.jsonl")),
                                                                            key=key)


# ---------------------------------------------------------------------------------- 3. non-finite numbers


def test_nan_rewards_are_judge_errors_masked_and_counted_never_a_reward(tmp_path):
    rows = train(_cfg(tmp_path, "run.steps=2"), judge=NaNJudge())
    for r in rows:
        assert r["judge_errors"] == 3 and r["judged"] == 3 and "update_skipped" not in r
        assert math.isfinite(r["reward_mean"]) and math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])


def test_an_infinite_teacher_skips_the_update_and_stops_with_the_last_good_weights(tmp_path, monkeypatch):
    import agentopd.train as T

    real = T.score

    def infinite_teacher(*a, **kw):
        got = real(*a, **kw)
        got.lt_BT.fill_(math.inf)
        return got

    monkeypatch.setattr(T, "score", infinite_teacher)
    with pytest.raises(faults.Stopped) as e:
        train(_cfg(tmp_path, "run.steps=4", "optim.max_bad_steps=2", "run.checkpoint_every=0"))
    assert e.value.code == faults.UNHEALTHY
    assert str(e.value).startswith("step 2: stopped after 2 skipped updates in a row (optim.max_bad_steps): "
                                   "teacher_logprobs is not finite; checkpoint ")
    assert "holds the weights it started from (no update was applied)" in str(e.value)
    assert [r["update_skipped"] for r in e.value.rows] == ["teacher_logprobs"] * 2
    from agentopd.testbed.tiny import build_tiny

    fresh, saved = build_tiny(seed=0)[0].state_dict(), _params(tmp_path, 2)
    assert all(torch.equal(fresh[k], saved[k]) for k in saved)  # no update was applied
    opt = torch.load(tmp_path / "checkpoints" / "step-2" / "trainer_state" / "optimizer.pt", weights_only=True)
    assert opt["state"] == {}  # and the optimizer's state is untouched


def test_a_huge_learning_rate_is_skipped_then_stopped_with_the_last_good_weights(tmp_path):
    """lr 1e30: step 1's update is finite and wrecks the weights; from step 2 on the model's numbers are
    not (its sampling draws uniformly and says so with NaN log-probs, never a crash)."""
    with pytest.raises(faults.Stopped) as e:
        train(_cfg(tmp_path, "run.steps=6", "optim.lr=1e30", "optim.max_bad_steps=3", "run.checkpoint_every=1"))
    assert e.value.code == faults.UNHEALTHY and "holds the last good weights (those of step 1)" in str(e.value)
    assert [bool(r.get("update_skipped")) for r in e.value.rows] == [False, True, True, True]
    one, last = _params(tmp_path, 1), _params(tmp_path, 4)
    assert all(torch.equal(one[k], last[k]) for k in one)


# ---------------------------------------------------------------------------------- 4. collapse


@pytest.mark.parametrize("guard", ["warn", "stop", "rollback"])
def test_a_run_forced_to_collapse_is_warned_stopped_or_rolled_back(tmp_path, guard, capsys):
    cfg = _cfg(tmp_path, "run.steps=4", "run.checkpoint_every=1", f"run.guard={guard}", "run.guard_window=1")
    if guard == "stop":
        with pytest.raises(faults.Stopped) as e:
            train(cfg, engine=Collapsing)
        assert e.value.code == faults.UNHEALTHY and str(e.value).startswith("step 3: collapse guard: response_len 1 ")
        return
    rows = train(cfg, engine=Collapsing)
    assert [r.get("guard") for r in rows] == [None, None, guard, guard]
    assert "step 3: collapse guard: response_len 1 is below 50% of its best, 12 at step 1" in capsys.readouterr().err
    if guard == "rollback":  # back to step 2 (the last step before the fall) each time, the lr halved each time
        two, four = _params(tmp_path, 2), _params(tmp_path, 4)
        assert all(torch.equal(two[k], four[k]) for k in two)
        opt = torch.load(tmp_path / "checkpoints" / "step-4" / "trainer_state" / "optimizer.pt", weights_only=True)
        assert opt["param_groups"][0]["lr"] == pytest.approx(cfg.optim.lr * 0.25)


# ---------------------------------------------------------------------------------- 5. services


@pytest.fixture
def docker(tmp_path_factory):
    why = PrivateDocker.available()
    if why:
        pytest.skip(why)
    d = PrivateDocker(Path("/tmp") / f"agentopd-docker-{os.getpid()}")  # (a short path: the socket's)
    d.start()
    yield d
    d.stop()
    shutil.rmtree(d.root, ignore_errors=True)


@pytest.mark.parametrize("back", [True, False], ids=["engine-back-in-time", "engine-stays-down"])
def test_the_docker_engine_stopped_mid_run(tmp_path, monkeypatch, docker, back):
    """The engine stops before step 2's judging: every sample fails in the sandbox. Started again
    before the retry, the step goes on with no error; left down, the run stops with a checkpoint of
    step 1 (exit 69) and resumes once the engine is back."""
    from agentopd.judges.tests import TestJudge

    monkeypatch.setenv("DOCKER_HOST", docker.env["DOCKER_HOST"])
    code = ["env.id=agentopd/Code-v0", "env.kwargs.problems=functions", "env.kwargs.n=8", "run.steps=3",
            "run.checkpoint_every=0", "run.service_retries=1"]
    judge = At(TestJudge(backend="docker", workers=1), at=2, act=docker.stop, then=docker.start if back else None)
    if back:
        rows = train(_cfg(tmp_path, *code), engine=Programs, judge=judge)
        assert [r["judge_errors"] for r in rows] == [0, 0, 0]
        return
    with pytest.raises(faults.Stopped) as e:
        train(_cfg(tmp_path, *code), engine=Programs, judge=judge)
    assert e.value.code == faults.SERVICE_DOWN
    assert str(e.value).startswith("step 2 not learned from: 6 of 6 samples could not be judged (sandbox failed")
    assert os.listdir(tmp_path / "checkpoints") == ["step-1"]
    docker.start()
    rows = train(_cfg(tmp_path, *code, "run.resume=true"), engine=Programs, judge=TestJudge(backend="docker", workers=1))
    assert [r["step"] for r in rows] == [2, 3] and all(r["judge_errors"] == 0 for r in rows)


def test_sandbox_workers_killed_mid_run_cost_no_sample(tmp_path):
    """Every warm sandbox worker killed from outside before step 2's judging: the pool starts new ones
    and every sample is judged."""
    from agentopd.judges.tests import TestJudge

    def kill_workers():
        for w in list(judge.sandbox.pool.live.values()):
            os.killpg(w.proc.pid, signal.SIGKILL)

    judge = TestJudge(backend="bwrap", workers=1) if shutil.which("bwrap") else None
    if judge is None:
        pytest.skip("bubblewrap is not installed")
    rows = train(_cfg(tmp_path, "env.id=agentopd/Code-v0", "env.kwargs.problems=functions", "env.kwargs.n=8",
                      "run.steps=2", "run.checkpoint_every=0"), engine=Programs, judge=At(judge, at=2, act=kill_workers))
    assert [r["judge_errors"] for r in rows] == [0, 0] and [r["judged"] for r in rows] == [6, 6]


@pytest.mark.parametrize("fault", ["killed", "slow"])
def test_the_llm_judge_server_killed_or_slow(tmp_path, no_proxy, fault):
    from agentopd.judges.llm import LLMJudge

    slow = tmp_path / "slow"
    server, url = server_process("llm-server", str(slow))
    act = server.kill if fault == "killed" else slow.touch
    judge = At(LLMJudge(model="rubric", base_url=url, timeout_s=2.0, max_retries=0, concurrency=6), at=2, act=act)
    try:
        with pytest.raises(faults.Stopped) as e:
            train(_cfg(tmp_path, "run.steps=3", "run.checkpoint_every=0", "run.service_retries=1"), judge=judge)
    finally:
        server.kill()
        server.wait()
    assert e.value.code == faults.SERVICE_DOWN and [r["judge_errors"] for r in e.value.rows] == [0]
    words = "Connection error" if fault == "killed" else "timed out"
    assert str(e.value).startswith("step 2 not learned from: 6 of 6 samples could not be judged (llm judge") and \
        words in str(e.value)
    assert os.listdir(tmp_path / "checkpoints") == ["step-1"]


def test_the_teacher_server_killed(tmp_path, no_proxy):
    server, url = server_process("teacher-server")
    teacher = [f"teacher.base_url={url}", "teacher.served_model=tiny", "teacher.context=[]", "teacher.timeout=5",
               "algo.loss=sdpo_token", "algo.distill_alpha=1", "run.service_retries=1"]
    try:
        with pytest.raises(faults.Stopped) as e:
            train(_cfg(tmp_path, "run.steps=3", "run.checkpoint_every=0", *teacher),
                  judge=At(GateJudge(str(tmp_path)), at=2, act=server.kill))
    finally:
        server.kill()
        server.wait()
    assert e.value.code == faults.SERVICE_DOWN and [r["teacher_errors"] for r in e.value.rows] == [0]
    assert str(e.value).startswith(f"step 2 not learned from: 6 of 6 teacher rows got no scores (the teacher at {url})")
    assert os.listdir(tmp_path / "checkpoints") == ["step-1"]


# ---------------------------------------------------------------------------------- 6. determinism under load


def _busy(cores: set, n: int) -> list[subprocess.Popen]:
    # each in a session of its own: with the scheduler's autogroups (sched_autogroup_enabled), the CPU
    # is shared between sessions first, and the sandboxed program runs in a session of its own too
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(n)]
    for p in procs:
        os.sched_setaffinity(p.pid, cores)
    return procs


def test_a_programs_verdict_does_not_depend_on_the_machines_load():
    """A program that computes for 1.2 s of CPU time under a 2 s limit passes alone and with two busy
    processes on its core (where it needs about 3.6 s of wall-clock time: past a 2 s wall-clock limit)."""
    from agentopd.judges.tests import TestJudge
    from agentopd.types import Problem

    p = Problem("cpu", "cpu", "code", {"style": "call", "tests": ["assert f(2) == 2"]})
    program = ("import time\ndef f(x):\n    t = time.process_time()\n    while time.process_time() - t < 1.2:\n"
               "        pass\n    return x\n")  # (a call-style judge runs definitions only: the loop is in f)
    was = os.sched_getaffinity(0)
    core = {min(was)}
    os.sched_setaffinity(0, core)  # the judge's workers start here, on this core
    judge = TestJudge(timeout_s=2.0, workers=1)
    try:
        assert judge.judge(p, program).verdict.status == "ok"
        busy = _busy(core, 2)
        try:
            t0 = time.monotonic()
            loaded = judge.judge(p, program)
            took = time.monotonic() - t0
        finally:
            for b in busy:
                b.kill()
    finally:
        judge.close()
        os.sched_setaffinity(0, was)
    assert loaded.verdict.status == "ok", loaded.critique
    assert took > 2.0  # the load did slow it past what a wall-clock limit of 2 s allowed


def test_a_programs_verdict_does_not_depend_on_which_worker_runs_it():
    """Set order and random draws are the same in every sandbox worker (PYTHONHASHSEED, random seeded)."""
    from agentopd.sandbox import make_sandbox

    program = "import random\nprint(list({'apple', 'kiwi', 'plum', 'fig', 'pear'}), random.random())"
    outs = set()
    for _ in range(2):  # two sandboxes: fresh workers, each its own interpreter
        sb = make_sandbox("auto", workers=1)
        try:
            outs |= {sb.run(program).stdout for _ in range(2)}
        finally:
            sb.close()
    assert len(outs) == 1, outs


def test_the_same_seed_gives_the_same_weights_under_a_competing_load(tmp_path):
    """Judging overlaps generation (two chunks); the second run trains while two busy processes share
    its cores."""
    common = ["run.steps=2", "run.checkpoint_every=2", "sampling.generate_chunk=1"]
    train(_cfg(tmp_path / "idle", *common))
    busy = _busy(os.sched_getaffinity(0), 2)
    try:
        train(_cfg(tmp_path / "busy", *common))
    finally:
        for b in busy:
            b.kill()
    a, b = _params(tmp_path / "idle"), _params(tmp_path / "busy")
    assert all(torch.equal(a[k], b[k]) for k in a)

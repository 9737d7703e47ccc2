"""The parts the fault tests (tests/test_faults.py) and bench/faults.py inject: judges that hold a
step at a gate or fail in a given way, a training subprocess, a small disk, a private Docker
engine, and loopback servers in processes of their own (killed for real).

A gate makes a fault's timing deterministic without a race: ``GateJudge`` writes ``ready`` (its
pid and rank) when its ``at``-th batch comes, and waits for a ``go`` file the test creates; the
test acts (a signal, a killed server) between the two. ``python tests/fault_parts.py llm-server``
and ``... teacher-server`` serve on loopback and print their URL.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from agentopd.inference.base import Engine
from agentopd.judges import BaseJudge, make_judge
from agentopd.types import Generation, Judgement, Verdict

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
TINY = ["run.progress=false", "model.path=tiny", "env.id=agentopd/Math-v0", "env.kwargs.problems=arithmetic",
        "env.kwargs.levels=[1,2]", "eval.problems=0", "sampling.prompts_per_step=2", "sampling.group_size=3",
        "sampling.max_new_tokens=12"]
"""The tiny training setting of tests/test_train.py (with configs/micro-sdpo.yaml)."""
WAIT_S = 600.0
"""How long a gate or a test waits at most for the other side: never reached unless broken."""


def wait_for(what, timeout: float = WAIT_S, every: float = 0.05):
    """``what()`` once it is truthy (polled), or AssertionError after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"waited {timeout:g} s for {what}")


class GateJudge(BaseJudge):
    """``inner`` (a judge spec; default the math judge), with a gate: its ``at``-th ``judge_many``
    call (1-based, in this process) writes ``gate_dir/ready`` and waits for ``gate_dir/go``.
    Every call appends its number to ``gate_dir/calls-<rank>``."""

    def __init__(self, gate_dir: str, at: int = 0, inner: str | dict = "math"):
        self.dir, self.at, self.calls = Path(gate_dir), at, 0
        self.inner = make_judge(inner)
        self.workers = getattr(self.inner, "workers", 1)

    def judge(self, problem, response):
        return self.judge_many([(problem, response)])[0]

    def judge_many(self, pairs, progress=None):
        self.calls += 1
        rank = os.environ.get("RANK", "0")
        with open(self.dir / f"calls-{rank}", "a") as f:
            f.write(f"{self.calls}\n")
        if self.calls == self.at:
            (self.dir / f"ready-{rank}").write_text(json.dumps({"pid": os.getpid(), "call": self.calls}))
            (self.dir / "ready").write_text(json.dumps({"pid": os.getpid(), "call": self.calls}))
            wait_for((self.dir / "go").exists)
        return self.inner.judge_many(pairs)

    def close(self):
        self.inner.close()


class NaNJudge(BaseJudge):
    """The math judge, except that every other sample gets a score of NaN, its status ``ok``: a
    judge's bug (never a reward)."""

    workers = 1

    def __init__(self):
        self.inner = make_judge("math")

    def judge_many(self, pairs, progress=None):
        out = self.inner.judge_many(pairs)
        return [Judgement(Verdict(math.nan, 1, 1, "ok")) if k % 2 else j for k, j in enumerate(out)]

    def close(self):
        self.inner.close()


class At(BaseJudge):
    """``inner``, with ``act()`` run before its ``at``-th ``judge_many`` call (the fault, at a known
    point of the run) and ``then()`` before the call after it (e.g. the service back)."""

    def __init__(self, inner, at: int, act, then=None):
        self.inner, self.at, self.act, self.then, self.calls = inner, at, act, then, 0
        self.workers = getattr(inner, "workers", 1)

    def judge_many(self, pairs, progress=None):
        self.calls += 1
        if self.calls == self.at:
            self.act()
        if self.calls == self.at + 1 and self.then is not None:
            self.then()
        return self.inner.judge_many(pairs)

    def close(self):
        self.inner.close()


# ------------------------------------------------------------------------------ engines


class Collapsing(Engine):
    """The tiny model's sampling, until call ``at``; from then on one token per answer (a length
    collapse, as late SDPO runs show)."""

    at = 3

    def __init__(self, model, tokenizer, device=None):
        from agentopd.inference.hf import HFEngine

        self.hf, self.tokenizer, self.calls = HFEngine(model, tokenizer, device=device), tokenizer, 0

    def generate(self, prompt_ids, n=1, **kw):
        self.calls += 1
        out = self.hf.generate(prompt_ids, n=n, **kw)
        if self.calls >= self.at:
            for gs in out:
                for g in gs:
                    g.response_ids, g.logprobs, g.finish_reason = g.response_ids[:1], g.logprobs[:1], "stop"
                    g.text = self.tokenizer.decode(g.response_ids)
        return out


class Programs(Engine):
    """Answers every code problem with the same correct-looking program (the judge must run it)."""

    def __init__(self, model, tokenizer, device=None):
        self.tokenizer = tokenizer

    def generate(self, prompt_ids, n=1, **kw):
        text = "```python\ndef f(x):\n    return x\n```"
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [[Generation(ids, [-1.0] * len(ids), text, "stop") for _ in range(n)] for _ in prompt_ids]


# ------------------------------------------------------------------------------ a training process


def train_process(out, *overrides, stderr=None, env=None, preexec_fn=None) -> subprocess.Popen:
    """``python -m agentopd train`` on the tiny setting in ``out`` (one torch thread; tests/ on the
    path, for the judges here); stdout and stderr to ``stderr`` (a path), else captured."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}",
               **(env or {})}
    sink = open(stderr, "w") if stderr else subprocess.PIPE  # noqa: SIM115  (the child holds it)
    cmd = [sys.executable, "-m", "agentopd", "train", "--config", str(ROOT / "configs" / "micro-sdpo.yaml"),
           *TINY, f"run.out={out}", *overrides]
    return subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True, env=environ, cwd=ROOT,
                            preexec_fn=preexec_fn)


def gate(gate_dir: Path, at: int = 0, inner: str = "math") -> str:
    """The override that puts a :class:`GateJudge` in the env."""
    gate_dir.mkdir(parents=True, exist_ok=True)
    return f"env.kwargs.judge={json.dumps({'name': 'fault_parts:GateJudge', 'gate_dir': str(gate_dir), 'at': at, 'inner': inner})}"


def sigterm_one_rank(out: Path, gate_dir: Path, log: Path, steps: int, at: int) -> None:
    """``agentopd train`` under torchrun (2 CPU ranks, ddp) held at the gate in step ``at``; SIGTERM to
    rank 1 alone once both ranks are there, the gate opened once rank 1 said it will stop; returns
    when torchrun ends (its output in ``log``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "agentopd",
           "train", "--config", str(ROOT / "configs" / "micro-sdpo.yaml"), *TINY, f"run.out={out}",
           f"run.steps={steps}", "run.checkpoint_every=0", "run.distributed=ddp", gate(gate_dir, at=at)]
    with open(log, "w") as sink:
        p = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        rank1 = json.loads(wait_for(lambda: (gate_dir / "ready-1").exists() and (gate_dir / "ready-1").read_text()))
        wait_for((gate_dir / "ready-0").exists)
        os.kill(rank1["pid"], signal.SIGTERM)
        wait_for(lambda: "SIGTERM: finishing the current step on every rank" in log.read_text())
        (gate_dir / "go").touch()
        p.wait(timeout=WAIT_S)


# ------------------------------------------------------------------------------ a small disk


@contextlib.contextmanager
def small_disk(path: Path, kb: int, force_limit: bool = False):
    """``(dir, how, limit)``: a real tmpfs of ``kb`` kB mounted at ``path`` (``how`` "tmpfs"; as root,
    unmounted at the end), else (or with ``force_limit``) the plain directory and ``limit``, a
    preexec_fn that caps every file a process writes at ``kb`` kB (RLIMIT_FSIZE, with SIGXFSZ ignored:
    the write fails with EFBIG; ``how`` "file-size limit")."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = not force_limit and os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield path, ("tmpfs" if mounted else "file-size limit"), (None if mounted else _fsize(kb))
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fsize(kb: int):
    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (kb << 10, kb << 10))
    return limit


def grow(path: Path, kb: int) -> None:
    """A mounted tmpfs at ``path`` resized to ``kb`` kB."""
    subprocess.run(["mount", "-o", f"remount,size={kb}k", str(path)], check=True, capture_output=True)


def agentopd(*args: str, env=None, preexec_fn=None) -> subprocess.CompletedProcess:
    """``python -m agentopd ARGS`` (one torch thread, tests/ on the path), its output captured."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "agentopd", *args], capture_output=True, text=True, env=environ,
                          cwd=ROOT, preexec_fn=preexec_fn, timeout=WAIT_S)


# ------------------------------------------------------------------------------ a private Docker engine


class PrivateDocker:
    """A Docker engine of its own (``dockerd`` on a socket under ``root``, no bridge, no iptables), so
    that a test can stop and start a real engine without touching the machine's. ``env``: the
    DOCKER_HOST that points the docker CLI at it."""

    def __init__(self, root: Path):
        self.root, self.proc = root, None
        self.sock = root / "docker.sock"
        self.env = {"DOCKER_HOST": f"unix://{self.sock}"}

    @staticmethod
    def available() -> str:
        """Why one cannot run here ('' when it can)."""
        if os.geteuid() != 0:
            return "a private Docker engine needs root"
        if not (shutil.which("dockerd") and shutil.which("docker")):
            return "no dockerd / docker here (apt-get install docker.io)"
        return ""

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        argv = ["dockerd", "--host", f"unix://{self.sock}", "--data-root", str(self.root / "data"),
                "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
                "--bridge", "none", "--iptables=false", "--ip6tables=false"]
        log = open(self.root / "dockerd.log", "a")  # noqa: SIM115  (the daemon holds it)
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        env = {**os.environ, **self.env}
        wait_for(lambda: subprocess.run(["docker", "version"], env=env, capture_output=True).returncode == 0,
                 timeout=120, every=0.2)

    def stop(self) -> None:
        """SIGTERM to the engine, and wait for it to end (its containers end with it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=120)
        self.proc = None


# ------------------------------------------------------------------------------ loopback servers


def server_process(kind: str, *args: str) -> tuple[subprocess.Popen, str]:
    """``python tests/fault_parts.py KIND`` (``llm-server [SLOW_FILE]`` or ``teacher-server``): the
    process and the URL it serves on 127.0.0.1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}
    p = subprocess.Popen([sys.executable, str(Path(__file__)), kind, *args], stdout=subprocess.PIPE, text=True,
                         env=env)
    return p, p.stdout.readline().strip()


def _serve(kind: str, args: list[str]) -> None:
    if kind == "llm-server":  # a rubric judge's replies; once the file args[0] exists, each after 60 s
        from openai_server import FakeOpenAIServer

        slow = Path(args[0]) if args else None
        reply = json.dumps({"score": 1.0, "critique": "fine"})
        server = FakeOpenAIServer(lambda body, i: ("slow", 60.0, reply) if slow and slow.exists() else reply)
    else:  # the tiny model, as vLLM serves a teacher's prompt log-probs
        from logprob_server import LogprobServer

        from agentopd.testbed.tiny import build_tiny

        server = LogprobServer(*build_tiny(seed=0), name="tiny")
    print(server.url, flush=True)
    while True:  # until killed
        time.sleep(60)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2:])

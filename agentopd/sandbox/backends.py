"""Sandboxes: run an untrusted Python program with no network, a private file system and limits.

One protocol (``Sandbox.run(program, stdin, limits) -> ExecResult``), several backends:

- ``bwrap``   bubblewrap namespaces: no network, read-only /usr, tmpfs work dir, no host secrets;
              ``warm=True`` keeps one sandboxed worker per pool slot that forks per program.
- ``docker``  a real Docker engine: warm containers (``--network none``, read-only root, memory
              and pids limits), each program run through a worker started with ``docker exec``.
- ``unshare`` util-linux namespaces (root only), tmpfs over the writable and secret places.
- ``process`` rlimits and a clean environment only: not isolation, and says so.

As root every backend runs the program as an unprivileged host uid of its own pool slot, so
RLIMIT_NPROC counts only that slot's processes and no program can signal another's.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import queue
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from agentopd.sandbox import calltests as _calltests
from agentopd.sandbox import zygote as _zygote
from agentopd.sandbox.workers import JsonWorker, WorkerPool
from agentopd.threads import worker_count
from agentopd.types import ExecResult

PYTHON = "/usr/bin/python3"  # the sandboxed interpreter, always by absolute path; standard library only (-S)
PYTHON_ARGS = ["-s", "-S", "-B"]
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
"""The whole environment of a sandboxed program (no -E: this is all there is). PYTHONHASHSEED fixes
str and bytes hashes, so the same program iterates a set of strings in the same order in every
worker and run: its verdict depends on the program alone, not on which worker ran it."""
BACKENDS = ("bwrap", "docker", "unshare", "process")
DOCKER_IMAGE = "agentopd-py:latest"
SLOT_UID_BASE = 61000  # blocks of 100 host uids: 0..79 cold runs, 90..99 warm workers
COLD_UIDS = 80


class SandboxUnavailable(RuntimeError):
    """A backend cannot run on this machine; the message names the fix."""


@dataclass
class Limits:
    """Per-program limits. Every backend enforces all of them."""

    timeout_s: float = 10.0
    """Wall-clock limit; the whole process tree is killed when it passes."""
    cpu_s: float | None = None
    """CPU-time limit (RLIMIT_CPU); default: the wall limit + 1 s."""
    memory_mb: int = 512
    """Address-space limit (RLIMIT_AS), and the container's memory limit under docker."""
    nproc: int = 32
    """Processes/threads the program may have at once (RLIMIT_NPROC / docker --pids-limit)."""
    fsize_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE)."""
    disk_mb: int = 64
    """Size of the tmpfs work dir."""
    output_bytes: int = 1 << 20
    """Captured bytes per stream; more kills the program with status ``output_limit``."""

    def as_dict(self):
        return dataclasses.asdict(self)


class Sandbox(Protocol):
    name: str

    def run(self, program: str, stdin: str = "", limits: Limits | None = None) -> ExecResult: ...

    def close(self) -> None: ...


def _result(d: dict, duration_s: float | None = None) -> ExecResult:
    d["oom"] = d.get("oom") or "MemoryError" in d["stderr"][-2000:]
    if d.get("timed_out"):
        status = "timeout"
    elif d.get("truncated"):
        status = "output_limit"
    elif d.get("oom"):
        status = "memory"
    elif d["exit_code"] != 0:
        status = "runtime_error"
    else:
        status = "ok"
    return ExecResult(
        status=status,
        exit_code=d["exit_code"],
        stdout=d["stdout"],
        stderr=d["stderr"],
        timed_out=bool(d.get("timed_out")),
        oom=bool(d.get("oom")),
        truncated=bool(d.get("truncated")),
        duration_s=duration_s if duration_s is not None else d.get("duration_s", 0.0),
    )


def _sandbox_error(msg: str, t0: float) -> ExecResult:
    return ExecResult("sandbox_error", None, "", msg, False, False, False, time.monotonic() - t0)


class _Slots:
    """Host uids for pool slots (as root); one program at a time per uid."""

    def __init__(self, n: int):
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._claim, block = _claim_uid_block()
        self.base = SLOT_UID_BASE + 100 * block
        for i in range(n):
            self.free.put(self.base + i)

    def take(self) -> int:
        return self.free.get()

    def release(self) -> None:
        """Give the uid block back to the host (closing the lock file drops the flock)."""
        self._claim.close()

    __del__ = release

    def give(self, uid: int) -> None:
        self.free.put(uid)


_slot_blocks = itertools.count()


def _claim_uid_block():
    """A block of 100 host uids that no other sandbox on this host holds, in this process or any
    other: a flock per block, held as long as the returned file is open. (Two processes that
    shared uids could kill or starve each other's programs: ``pkill -u``, RLIMIT_NPROC.)"""
    import fcntl

    lock_dir = "/run/lock" if os.path.isdir("/run/lock") else "/tmp"
    start = next(_slot_blocks)
    for i in range(300):
        block = (start + i) % 300
        f = open(os.path.join(lock_dir, f"agentopd-uids-{block}.lock"), "a")  # noqa: SIM115 (held open)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f, block
        except OSError:
            f.close()
    raise SandboxUnavailable("all 300 blocks of sandbox uids are in use on this host")


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _spawn_and_collect(argv, *, stdin_data: str, limits: Limits, uid: int | None, pass_fds=(), cwd=None,
                       apply_rlimits=True, wrapped=False) -> ExecResult:
    """Start ``argv`` in a new session (as ``uid``, under ``limits``), collect its output, kill the
    whole group when it overruns, and reap it."""
    lim = limits.as_dict()
    in_fd = _memfd("stdin", stdin_data.encode("utf-8", "surrogateescape"))

    def pre():
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        if apply_rlimits:
            _zygote.rlimits(lim)

    t0 = time.monotonic()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        p = subprocess.Popen(argv, stdin=in_fd, stdout=out_w, stderr=err_w, pass_fds=pass_fds, cwd=cwd,
                             env=dict(ENV), preexec_fn=pre,
                             start_new_session=True)
    except OSError as e:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        return _sandbox_error(f"could not start {argv[0]}: {e}", t0)
    finally:
        os.close(in_fd)
    os.close(out_w)
    os.close(err_w)
    d = _zygote.collect(p.pid, out_r, err_r, t0 + limits.timeout_s, limits.output_bytes, exit_128_is_signal=wrapped)
    p.returncode = d["exit_code"]  # collect() reaped it; stop Popen from waiting again
    return _result(d, time.monotonic() - t0)


# --------------------------------------------------------------------------------- bubblewrap


def _bwrap_argv(limits: Limits, work="/work", warm: bool = False, pid1: bool = False) -> list[str]:
    # cold: bwrap's own init reaps and dies with its parent (the calling thread, which waits for
    # it). warm: the worker is pid 1 itself, so its programs cannot signal it; it ends on EOF.
    # pid1 (cold runs of a known program: the call-tests driver): the program is pid 1 itself, as
    # no bwrap init may hold the run's stdin and stdout where the driver's children could open them
    argv = ["bwrap", "--unshare-all", *(["--as-pid-1"] if warm or pid1 else []),
            *([] if warm else ["--die-with-parent"]), "--new-session",
            "--cap-drop", "ALL",
            "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib"]
    if os.path.isdir("/usr/lib64"):
        argv += ["--symlink", "usr/lib64", "/lib64"]
    size = ["--size", str(limits.disk_mb * (1 << 20))]  # --size applies to the next --tmpfs only
    # every writable place is a size-limited tmpfs (tmpfs pages are host memory that RLIMIT_AS
    # does not count); the root and /dev tmpfs bwrap makes are remounted read-only
    argv += ["--proc", "/proc", "--dev", "/dev", *size, "--tmpfs", "/dev/shm", "--mqueue", "/dev/mqueue",
             *size, "--tmpfs", "/tmp", *size, "--tmpfs", work, "--remount-ro", "/dev", "--remount-ro", "/",
             "--chdir", work,
             "--clearenv", *[a for k, v in ENV.items() for a in ("--setenv", k, v)],
             "--setenv", "HOME", work, "--uid", "65534", "--gid", "65534"]
    return argv


_ZYGOTE_SRC = open(_zygote.__file__, encoding="utf-8").read()
# programs the sandboxes know (the call-tests driver): a cold run starts it as pid 1 of its own
# sandbox; a warm worker runs its tests in the worker's helper, against a candidate forked from
# the worker (see _zygote.serve), so a call-style run costs one fork
KNOWN_PROGRAMS = (_calltests.program(),)
_WORKER_CMD = [PYTHON, *PYTHON_ARGS, "-c", _ZYGOTE_SRC, "/work", KNOWN_PROGRAMS[0]]
_CLEAN_ENV = ENV


def _as_uid(uid: int | None):
    if uid is None:
        return None

    def pre():
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    return pre


def _frames(data: bytes) -> tuple[bytes, bytes, bytes]:
    """The call driver's stdin (two ``<length>\\n<JSON>`` frames: the program, the tests) as a warm
    call-style request's blobs: the program, an empty stdin, the tests. ValueError when it is
    not two frames."""
    frames = []
    for _ in range(2):
        head, _, data = data.partition(b"\n")
        n = int(head)
        if len(data) < n:
            raise ValueError("agentopd call driver: truncated request")
        frames.append(data[:n])
        data = data[n:]
    return frames[0], b"", frames[1]


def _driver_failed(e: ValueError) -> ExecResult:
    """What the driver run on its own answers to a request it cannot read: its traceback."""
    return _result({"exit_code": 1, "stdout": "", "stderr": f"Traceback (most recent call last):\nValueError: {e}\n"})


class _WarmSandbox:
    """A pool of warm workers (``_zygote.serve`` in a sandbox), one per slot, each forking per
    program. A worker that stops answering is killed and replaced; the caller gets ``timeout``
    (past the program's limit) or ``sandbox_error``, never a hang."""

    GRACE_S = 5.0
    rlimit_nproc = True

    def __init__(self, workers: int | None):
        self.workers = worker_count(workers)
        self.pool = WorkerPool(self._start_worker, self.workers)

    def _start_worker(self, slot: int, key) -> JsonWorker:
        raise NotImplementedError

    def run(self, program: str, stdin: str = "", limits: Limits | None = None) -> ExecResult:
        limits = limits or Limits()
        lim = limits.as_dict()
        if not self.rlimit_nproc:
            lim["nproc"] = 0
        call = program == KNOWN_PROGRAMS[0]
        try:
            blobs = (_frames(stdin.encode("utf-8", "surrogateescape")) if call
                     else (program.encode("utf-8", "surrogateescape"), stdin.encode("utf-8", "surrogateescape")))
        except ValueError as e:
            return _driver_failed(e)
        header = json.dumps({"limits": lim, "call": call, "sizes": [len(b) for b in blobs]}).encode()
        req, blobs = {"header": len(header)}, (header, *blobs)  # (the worker reads the line a byte at a time)
        key = (limits.disk_mb, limits.memory_mb, limits.nproc)
        t0 = time.monotonic()
        for attempt in range(2):
            try:
                reply = self.pool.call(req, limits.timeout_s + self.GRACE_S, key, blobs)
            except RuntimeError as e:
                return _sandbox_error(f"warm sandbox worker did not start: {e}", t0)
            if reply is not None:
                out, err = reply.pop("attachments")
                reply["stdout"], reply["stderr"] = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
                return _result(reply)
            elapsed = time.monotonic() - t0
            if elapsed >= limits.timeout_s:
                return _result({"timed_out": True, "exit_code": -9, "stdout": "", "stderr": ""}, elapsed)
            # a worker exits when it cannot clean up after the previous program; that can race
            # with this request, which then gets one more try on a fresh worker
        return _sandbox_error("warm sandbox worker died", t0)

    def close(self):
        self.pool.close()


class BwrapSandbox(_WarmSandbox):
    """bubblewrap: warm (default: forking workers that are pid 1 of their sandbox) or cold (a
    fresh namespace per program)."""

    name = "bwrap"

    def __init__(self, workers: int | None = None, warm: bool = True):
        if not shutil.which("bwrap"):
            raise SandboxUnavailable("bwrap backend: bubblewrap is not installed (apt-get install bubblewrap)")
        super().__init__(workers)
        self.warm = warm
        self.root = os.geteuid() == 0
        # cold runs rotate through many uids: a uid's last processes may still be zombies being
        # reaped by the host's init, and they count against the next run's RLIMIT_NPROC
        self.slots = _Slots(COLD_UIDS) if self.root else None
        self.name = "bwrap" if warm else "bwrap-cold"

    def _start_worker(self, slot: int, key) -> JsonWorker:
        disk_mb, memory_mb, nproc = key
        uid = self.slots.base + 90 + slot if self.root else None
        argv = _bwrap_argv(Limits(disk_mb=disk_mb), warm=True) + _WORKER_CMD
        return JsonWorker(argv, env=_CLEAN_ENV, preexec_fn=_as_uid(uid), key=key)

    def run(self, program: str, stdin: str = "", limits: Limits | None = None) -> ExecResult:
        if self.warm:
            return super().run(program, stdin, limits)
        limits = limits or Limits()
        uid = self.slots.take() if self.slots else None
        fd = _memfd("main.py", program.encode("utf-8", "surrogateescape"))
        try:
            argv = _bwrap_argv(limits, pid1=program in KNOWN_PROGRAMS) + ["--file", str(fd), "/work/main.py",
                                          PYTHON, *PYTHON_ARGS, "/work/main.py"]
            return _spawn_and_collect(argv, stdin_data=stdin, limits=limits, uid=uid, pass_fds=(fd,), wrapped=True)
        finally:
            os.close(fd)
            if uid is not None:
                self.slots.give(uid)

    def close(self):
        super().close()
        if self.slots:
            self.slots.release()


# ------------------------------------------------------------------------------------ docker


class DockerSandbox(_WarmSandbox):
    """Warm containers (one per pool slot) on a real Docker engine. Each container's main process
    (pid 1, uid 65534, out of its programs' reach) is the forking worker, attached through
    ``docker run -i``: no per-program ``docker exec`` (~50 ms each). Timeouts kill inside the
    container; a worker that stops answering gets its container removed and replaced."""

    name = "docker"
    rlimit_nproc = False  # RLIMIT_NPROC would count every host process of uid 65534; --pids-limit bounds them

    def __init__(self, workers: int | None = None, image: str = DOCKER_IMAGE):
        if not shutil.which("docker"):
            raise SandboxUnavailable("docker backend: the docker CLI is not installed (apt-get install docker.io)")
        info = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                              text=True, timeout=30)
        if info.returncode != 0:
            raise SandboxUnavailable("docker backend: no Docker engine answers (start it: dockerd &, or "
                                     "systemctl start docker)")
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
            build_local_image(image)
        self.image = image
        self.containers: dict[int, str] = {}
        super().__init__(workers)

    def _start_worker(self, slot: int, key) -> JsonWorker:
        disk_mb, memory_mb, nproc = key
        old = self.containers.pop(slot, None)
        if old:
            subprocess.run(["docker", "rm", "-f", old], capture_output=True)
        name = f"agentopd-{os.getpid()}-{id(self) % 100000}-{slot}-{next(_container_ids)}"
        mb = memory_mb + 64
        self.containers[slot] = name
        argv = ["docker", "run", "-i", "--rm", "--name", name, "--network", "none", "--read-only",
                "--user", "65534:65534", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--memory", f"{mb}m", "--memory-swap", f"{mb}m", "--pids-limit", str(nproc + 8),
                "--tmpfs", f"/work:rw,exec,size={disk_mb}m,uid=65534,gid=65534,mode=0700",
                "--tmpfs", f"/tmp:rw,size={disk_mb}m,mode=1777", "-v", "/usr:/usr:ro",
                *[a for k, v in ENV.items() for a in ("-e", f"{k}={v}")], "-e", "HOME=/work",
                self.image, *_WORKER_CMD]
        try:
            return JsonWorker(argv, key=key)
        except RuntimeError:
            r = subprocess.run(["docker", "rm", "-f", name], capture_output=True, text=True)
            raise RuntimeError(f"docker container {name} did not start ({r.stderr.strip() or 'no reply'})") from None

    def close(self):
        super().close()
        for name in self.containers.values():
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        self.containers.clear()


_container_ids = itertools.count()


def build_local_image(image: str = DOCKER_IMAGE) -> None:
    """Create a minimal image with no registry access: an empty root whose /usr the host
    bind-mounts read-only at run time (``docker import`` of a tar of a few directories)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("usr", "tmp", "work", "proc", "dev", "etc", "sys", "sbin"):  # sbin: --init mounts docker-init there
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(ti)
        for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
            ti = tarfile.TarInfo(link)
            ti.type, ti.linkname = tarfile.SYMTYPE, target
            tar.addfile(ti)
        for name, text in (("etc/passwd", "root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/work:/bin/sh\n"),
                           ("etc/group", "root:x:0:\nnogroup:x:65534:\n")):
            data = text.encode()
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    r = subprocess.run(["docker", "import", "-", image], input=buf.getvalue(), capture_output=True)
    if r.returncode != 0:
        raise SandboxUnavailable(f"docker backend: could not build the local image: {r.stderr.decode().strip()}")


# ----------------------------------------------------------------------------------- unshare


_UNSHARE_SH = (
    "set -e; for d in /tmp /var/tmp /dev/shm /root /home /run; do [ -d $d ] && mount -t tmpfs -o size=$2 t $d; done; "
    "mkdir /tmp/w; chown $1:$1 /tmp/w; cd /tmp/w; cat /proc/self/fd/$3 >main.py; "  # dash: no fd >= 10 in <&N
    "setpriv --reuid $1 --regid $1 --clear-groups --inh-caps=-all --bounding-set=-all "
    "/usr/bin/python3 -s -S -B main.py"  # (the environment is ENV: no -E, PYTHONHASHSEED holds)
)  # no exec: the shell stays the namespace's init. A program as init would ignore default-action
#    signals (SIGXCPU, its own SIGKILL), and setpriv's uid change would clear the parent-death
#    signal unshare gives init, so a program that setsid()s would outlive the kill of unshare's
#    group. The shell reports the program's death by signal N as exit code 128 + N.


class UnshareSandbox:
    """util-linux ``unshare`` (root only): new net/pid/ipc/uts/mount namespaces, tmpfs over /tmp,
    /var/tmp, /dev/shm, /root, /home and /run, the program as a slot uid."""

    name = "unshare"

    def __init__(self, workers: int | None = None):
        if os.geteuid() != 0:
            raise SandboxUnavailable("unshare backend needs root; use bwrap (apt-get install bubblewrap)")
        for tool in ("unshare", "setpriv"):
            if not shutil.which(tool):
                raise SandboxUnavailable(f"unshare backend: {tool} is missing (apt-get install util-linux)")
        self.slots = _Slots(COLD_UIDS)

    def run(self, program: str, stdin: str = "", limits: Limits | None = None) -> ExecResult:
        limits = limits or Limits()
        uid = self.slots.take()
        fd = _memfd("main.py", program.encode("utf-8", "surrogateescape"))
        try:
            argv = ["unshare", "--net", "--pid", "--ipc", "--uts", "--mount", "--fork", "--mount-proc",
                    "--kill-child=SIGKILL", "--", "/bin/sh", "-c", _UNSHARE_SH, "sh", str(uid),
                    f"{limits.disk_mb}m", str(fd)]
            return _spawn_and_collect(argv, stdin_data=stdin, limits=limits, uid=None, pass_fds=(fd,),
                                      apply_rlimits=True, wrapped=True)
        finally:
            os.close(fd)
            self.slots.give(uid)

    def close(self):
        self.slots.release()


# ----------------------------------------------------------------------------------- process


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid``: a child becomes that uid and signals -1."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, 9)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


class ProcessSandbox:
    """rlimits, a clean environment and a private temp dir; NOT isolation (network, the file
    system and other processes stay reachable). Root only: the program runs as a slot uid, and
    whatever it leaves running is killed by that uid."""

    name = "process"
    _warned = False

    def __init__(self, workers: int | None = None):
        if os.geteuid() != 0:
            raise SandboxUnavailable(
                f"process backend needs root: as uid {os.geteuid()} a program would share the judge's uid, so it "
                "could read the judge's memory (the tests) and leave processes running; use bwrap "
                "(apt-get install bubblewrap) or docker")
        if not ProcessSandbox._warned:
            warnings.warn("sandbox backend 'process' is not isolation: programs can reach the network and "
                          "the file system; use bwrap or docker for untrusted code", stacklevel=2)
            ProcessSandbox._warned = True
        self.slots = _Slots(COLD_UIDS)

    def run(self, program: str, stdin: str = "", limits: Limits | None = None) -> ExecResult:
        import tempfile

        limits = limits or Limits()
        uid = self.slots.take()
        d = tempfile.mkdtemp(prefix="agentopd-")
        try:
            with open(os.path.join(d, "main.py"), "w", encoding="utf-8") as f:
                f.write(program)
            os.chown(d, uid, uid)
            res = _spawn_and_collect([PYTHON, *PYTHON_ARGS, "main.py"], stdin_data=stdin, limits=limits,
                                     uid=uid, cwd=d)
            _kill_uid(uid)  # a straggler that setsid()'d away still runs as this uid: end it
            return res
        finally:
            shutil.rmtree(d, ignore_errors=True)
            self.slots.give(uid)

    def close(self):
        self.slots.release()


# ------------------------------------------------------------------------------ choosing one


def _probe(sb) -> bool:
    r = sb.run("print(6 * 7)", limits=Limits(timeout_s=20))
    return r.status == "ok" and r.stdout.strip() == "42"


def make_sandbox(backend: str = "auto", workers: int | None = None, warm: bool = True) -> Sandbox:
    """Build a sandbox by name. ``auto`` tries bwrap, docker, unshare, then process, and warns
    when it falls back to a weaker one."""
    if backend == "auto":
        errors = []
        for name in ("bwrap", "docker", "unshare", "process"):
            try:
                sb = make_sandbox(name, workers, warm)
            except SandboxUnavailable as e:
                errors.append(str(e))
                continue
            if name == "process" or _probe(sb):
                if errors:
                    warnings.warn(f"sandbox: fell back to '{name}' ({'; '.join(errors)})", stacklevel=2)
                return sb
            sb.close()
            errors.append(f"{name} backend failed its self-test")
        raise SandboxUnavailable("no sandbox backend works: " + "; ".join(errors))
    if backend in ("bwrap", "bwrap-warm"):
        return BwrapSandbox(workers, warm=warm)
    if backend == "bwrap-cold":
        return BwrapSandbox(workers, warm=False)
    if backend == "docker":
        return DockerSandbox(workers)
    if backend == "unshare":
        return UnshareSandbox(workers)
    if backend == "process":
        return ProcessSandbox(workers)
    raise ValueError(f"unknown sandbox backend {backend!r}; choose from auto, {', '.join(BACKENDS)}, bwrap-cold")


def run_many(sandbox: Sandbox, jobs: Iterable[tuple[str, str, Limits | None]], workers: int | None = None,
             progress=None) -> list[ExecResult]:
    """Run (program, stdin, limits) jobs on a pool sized to the machine; results in input order."""
    jobs = list(jobs)
    n = workers or getattr(sandbox, "workers", None) or worker_count()
    with ThreadPoolExecutor(max_workers=n) as ex:
        futs = [ex.submit(sandbox.run, *job) for job in jobs]
        out = []
        for f in futs:
            out.append(f.result())
            if progress:
                progress(1)
        return out

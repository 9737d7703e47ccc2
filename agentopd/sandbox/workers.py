"""Long-lived worker subprocesses that answer one JSON object per line, with hard deadlines.

Used wherever work must stay bounded in time whatever it does: the warm sandbox workers, and the
math verifier (math-verify's own timeout uses SIGALRM, which only works in a main thread). A
worker that misses its deadline, dies or answers garbage is killed (its whole process group) and
replaced on the next call; the caller gets ``None``, never a hang. A deadline can be of the
worker's CPU time (``cpu_s``), which the machine's load does not change: the same request gets
the same answer on a busy machine as on an idle one.
"""
from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Hashable


def wall_limit(cpu_s: float) -> float:
    """The wall-clock backstop of work allowed ``cpu_s`` of CPU time: 3 x plus 10 s, so that it gets
    its CPU time on a machine 3 x busier than it needs (on an idle one, 13 s for 1 s)."""
    return 3 * cpu_s + 10.0


def cpu_time(pid: int) -> float | None:
    """Seconds of CPU time process ``pid`` has used (the scheduler's count; alive or a zombie), or None."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def module_worker(module: str, env: dict | None = None, **kw) -> JsonWorker:
    """A :class:`JsonWorker` running ``python -m module`` from agentopd's own installation, whatever
    the caller's working directory: it starts in the directory that holds this ``agentopd`` package
    (``-m`` puts the working directory first on the path), so a checkout or any other ``agentopd/``
    folder where the user stands is never imported instead."""
    import agentopd

    root = os.path.dirname(os.path.dirname(os.path.abspath(agentopd.__file__)))
    return JsonWorker([sys.executable, "-m", module], env=env, cwd=root, **kw)


class JsonWorker:
    def __init__(self, argv: list[str], env: dict | None = None, preexec_fn=None, key: Hashable = None,
                 ready_timeout: float = 60.0, cwd: str | None = None):
        """Start ``argv`` (in ``cwd``); it must print one JSON line (e.g. ``{"ready": true}``) when ready."""
        self.key = key
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, preexec_fn=preexec_fn, start_new_session=True, cwd=cwd)
        self.buf = b""
        self.cpu_until: float | None = None  # a call's CPU-time deadline (the worker's total)
        if self._readline(time.monotonic() + ready_timeout) is None:
            self.kill()
            raise RuntimeError(f"worker {argv[0]} did not start")

    def _over_cpu(self) -> bool:
        return self.cpu_until is not None and (cpu_time(self.proc.pid) or 0.0) > self.cpu_until

    def _readline(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            poll = left if self.cpu_until is None else min(left, 0.05)
            if left <= 0 or self._over_cpu():
                return None
            if not select.select([fd], [], [], poll)[0]:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def _readexact(self, n: int, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, max(n - len(self.buf), 1 << 16))
            if not chunk:
                return None
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def call(self, request: dict, timeout: float, blobs: tuple[bytes, ...] = (), cpu_s: float | None = None) -> dict | None:
        """Send a request (and raw ``blobs`` after its line); the reply, or None if none came in
        time (the worker is then dead): within ``timeout`` seconds, and with ``cpu_s``, within that
        much of the worker's CPU time too (``timeout`` is then the wall-clock backstop).
        A reply may announce raw byte blobs that follow its line (``"attach": [sizes]``); they
        come back as ``reply["attachments"]``."""
        deadline = time.monotonic() + timeout
        start = cpu_time(self.proc.pid) if cpu_s is not None else None
        self.cpu_until = None if start is None else start + cpu_s
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n" + b"".join(blobs))
            self.proc.stdin.flush()
            line = self._readline(deadline)
            reply = json.loads(line) if line is not None else None
            if reply is not None and "attach" in reply:
                blobs = [self._readexact(n, deadline) for n in reply["attach"]]
                reply = None if any(b is None for b in blobs) else {**reply, "attachments": blobs}
        except (OSError, ValueError):
            reply = None
        if reply is None:
            self.kill()
        return reply

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class WorkerPool:
    """``size`` slots; each holds at most one worker, started lazily by ``start(slot, key)`` and
    restarted when it died or when a call asks for a different ``key`` (e.g. other limits)."""

    def __init__(self, start: Callable[[int, Hashable], JsonWorker], size: int):
        self.start = start
        self.size = size
        self.idle: queue.SimpleQueue[tuple[int, JsonWorker | None]] = queue.SimpleQueue()
        self.live: dict[int, JsonWorker] = {}
        self.lock = threading.Lock()
        for slot in range(size):
            self.idle.put((slot, None))

    def call(self, request: dict, timeout: float, key: Hashable = None, blobs: tuple[bytes, ...] = (),
             cpu_s: float | None = None) -> dict | None:
        """Run one request on a free worker (:meth:`JsonWorker.call`). Raises RuntimeError if a
        worker cannot start."""
        slot, w = self.idle.get()
        try:
            if w is not None and (w.key != key or not w.alive()):
                w.kill()
                w = None
            if w is None:
                w = self.start(slot, key)
                with self.lock:
                    self.live[slot] = w
            reply = w.call(request, timeout, blobs, cpu_s)
            if reply is None:
                w = None
            return reply
        finally:
            self.idle.put((slot, w))

    def close(self) -> None:
        with self.lock:
            for w in self.live.values():
                w.kill()
            self.live.clear()

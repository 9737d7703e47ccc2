"""What a long run meets besides its own numbers: a stop signal from the scheduler, a disk that
fills up, services that die. (What watches the numbers, non-finite updates and collapse, is
:mod:`agentopd.rl.guard`.)

Every way a run stops early is a :class:`Stopped` with one line and an exit status that says what
to do next; the ``agentopd`` command prints the line and exits with the status:

=====================  ====  ==============================================================
status                 code  meaning
=====================  ====  ==============================================================
:data:`INTERRUPTED`     75   a stop signal: a checkpoint of the last completed step was
                             written; ``run.resume=true`` continues exactly (EX_TEMPFAIL)
:data:`WRITE_FAILED`    74   a checkpoint or results write failed (a full disk): its partial
                             files are gone, the last good checkpoint is the newest (EX_IOERR)
:data:`SERVICE_DOWN`    69   a step's judge or teacher errors passed ``run.max_error_rate``
                             after the retries: a checkpoint of the last completed step
                             (EX_UNAVAILABLE)
:data:`UNHEALTHY`       65   ``optim.max_bad_steps`` non-finite updates in a row, or the
                             collapse guard's ``stop``: a checkpoint of the current weights
=====================  ====  ==============================================================

A second stop signal stops at once (:class:`StopAtOnce`; the command exits with 128 + the signal's
number: 130 for SIGINT, 143 for SIGTERM), without a checkpoint. This module imports no torch.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback

INTERRUPTED = 75
WRITE_FAILED = 74
SERVICE_DOWN = 69
UNHEALTHY = 65


class Stopped(Exception):
    """The run stopped before its last step, on purpose; ``str(self)`` is the one line to show and
    ``code`` the exit status. ``rows``: the metrics rows of the steps it did."""

    def __init__(self, message: str, code: int, rows: list | None = None):
        super().__init__(message)
        self.code, self.rows = code, rows or []


class WriteFailed(Stopped):
    """A write that failed (no space, a file-size limit, an I/O error); its partial files are
    removed. ``path``: what was being written; ``need`` and ``free``: bytes."""

    def __init__(self, message: str, path: str, need: int, free: int):
        super().__init__(message, WRITE_FAILED)
        self.path, self.need, self.free = path, need, free


class StepAbandoned(BaseException):  # noqa: N818  (like KeyboardInterrupt: no `except Exception` stops it)
    """Raised in the main thread when a stop signal's grace would pass before the current step
    ends, while the step is still in a part that changes no training state."""


class StopAtOnce(BaseException):  # noqa: N818  (like KeyboardInterrupt)
    """A second stop signal, raised in the main thread: stop now, without a checkpoint (the
    ``agentopd`` command then exits at once with 128 + ``signum``)."""

    def __init__(self, signum: int):
        super().__init__(f"second {signal.Signals(signum).name}: stopped at once, without a checkpoint")
        self.signum = signum


def say(message: str) -> None:
    """One line on stderr, above any progress bar."""
    from tqdm import tqdm

    tqdm.write(f"agentopd: {message}", file=sys.stderr)


def leave(code: int, now: bool = False) -> int:
    """The exit status ``code``, returned; the process ends here instead, its output flushed, when
    ``now`` or where an abandoned step left worker threads running (they would hold the
    interpreter's exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if now or any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        os._exit(code)
    return code


# ------------------------------------------------------------------------------ disk space


def human(n: float) -> str:
    """``n`` bytes as ``1.5 MB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def free_bytes(path: str) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def dir_size(path: str) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(d, f)).st_size
    return total


def _cause(e: BaseException) -> str | None:
    """Why a write failed, in words; None when ``e`` is not a write failure (a bug: re-raised).
    safetensors reports the OS error inside its own exception; torch.save only that its zip writer
    failed (a RuntimeError raised in torch.serialization)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = (str(e).splitlines() or [""])[0][:200]
    code = re.search(r"code: (\d+)", str(e))  # safetensors: IoError(Os { code: 28, kind: StorageFull, ... })
    if type(e).__name__ == "SafetensorError":
        return os.strerror(int(code[1])) if code else text
    frames = [f.f_code.co_filename.replace(os.sep, "/") for f, _ in traceback.walk_tb(e.__traceback__)]
    if any(f.endswith("torch/serialization.py") for f in frames):
        return f"torch.save failed: {text}"
    return None


@contextlib.contextmanager
def writing(path: str, need: int = 0, what: str = "write", after: str = "", cleanup=None):
    """Turn a failed write of ``path`` inside the block into :class:`WriteFailed`: one line naming
    the path, the cause, the free space and the ``need`` (bytes), then ``after``. ``cleanup()``
    runs first (removing the partial files)."""
    try:
        yield
    except Exception as e:
        cause = _cause(e)
        if cause is None:
            raise
        if cleanup is not None:
            cleanup()
        free = free_bytes(path)
        if free < need and not isinstance(e, OSError) and "space" not in cause.lower():
            cause = f"{os.strerror(errno.ENOSPC)} ({cause})"  # torch.save says only that the write failed
        room = f"{human(free)} free there" + (f", about {human(need)} needed" if need else "")
        raise WriteFailed(f"cannot {what} {path}: {cause}; {room}" + (f"; {after}" if after else ""),
                          path, need, free) from None


def write_text(path: str, text: str) -> None:
    """``path`` holds ``text``, written atomically (a temporary file, then a rename); a failure
    leaves the old file and no temporary one, and raises :class:`WriteFailed`."""
    tmp = path + ".tmp"
    try:
        with writing(path, len(text.encode("utf-8", "surrogatepass"))):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def check_space(where: str, need: int, what: str) -> None:
    """The early warning: a line when the filesystem of ``where`` has less than twice ``need``
    free (the next write of that size fits at most once more)."""
    free = free_bytes(where)
    if need and free < 2 * need:
        fits = "this one may not fit" if free < need else "the next one will not fit"
        say(f"low disk space: {human(free)} free for {where}, and the last {what} took {human(need)}: {fits}")


# ------------------------------------------------------------------------------ stop signals


class GracefulStop:
    """SIGTERM and SIGINT during a run, as cluster schedulers send them before a SIGKILL (installed
    by ``with``, in the main thread; elsewhere nothing is installed).

    The first signal asks for a stop (:attr:`requested`): the run finishes the step it is in, writes
    a checkpoint and stops with :data:`INTERRUPTED`. While the step is in a part that changes no
    training state (inside :meth:`abandonable`: rollouts, judging, scoring) and ``abandon`` is on,
    it is abandoned instead, by :class:`StepAbandoned` raised in the main thread, when finishing it
    would pass ``grace_s``: at once when the last step's timing (:meth:`record`) says it would,
    else when the grace, less what the rest of the last step and its checkpoint took, has passed.
    A second signal raises :class:`StopAtOnce` in the main thread (the command exits at once with
    128 + its number), without a checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float, abandon: bool = True):
        self.grace_s, self.abandon = grace_s, abandon
        self.signum: int | None = None
        self.at = 0.0
        self.inside, self.started = False, 0.0
        self.part_s = self.tail_s = 0.0  # the last step's abandonable part, and what followed it
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._on_signal)
            self._old[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_alarm)
        return self

    def __exit__(self, *exc) -> None:
        if self._old:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()

    @contextlib.contextmanager
    def abandonable(self):
        """The block changes no training state: a stop signal may abandon it."""
        self.inside, self.started = True, time.monotonic()
        try:
            if self.requested and self.abandon:
                self._check()
            yield
        finally:
            self.inside = False

    def record(self, part_s: float, tail_s: float) -> None:
        """The last step's timing: its abandonable part, and the rest (update, evaluation, checkpoint)."""
        self.part_s, self.tail_s = part_s, tail_s

    def _on_signal(self, signum, frame) -> None:
        if self.requested:  # a second signal
            raise StopAtOnce(signum)
        self.signum, self.at = signum, time.monotonic()
        how = f", or abandoning it if {self.grace_s:g} s would pass" if self.abandon else " on every rank"
        os.write(2, f"\nagentopd: {self.name}: finishing the current step{how}, then a checkpoint; "
                    "send it again to stop at once\n".encode())
        if self.abandon:
            self._check()

    def _on_alarm(self, signum, frame) -> None:
        if self.inside:
            raise StepAbandoned(f"the grace of {self.grace_s:g} s")

    def _check(self) -> None:
        """In the abandonable part: abandon now if its expected end (the last step's timing) comes
        after the grace less the tail; else set an alarm for when that time comes."""
        if not self.inside:
            return
        now = time.monotonic()
        left = self.at + self.grace_s - self.tail_s - now
        expected = self.started + self.part_s - now
        if left <= 0 or expected > left:
            raise StepAbandoned(f"the grace of {self.grace_s:g} s")
        signal.setitimer(signal.ITIMER_REAL, left)


# ------------------------------------------------------------------------------ services


def retry_outage(call, items: list, failed, reason, what: str, max_rate: float, retries: int,
                 backoff_s: float) -> list:
    """``call(items)``, one result per item. While more than ``max_rate`` of the results failed
    (``failed(result)``: an outage, not a few bad samples), wait (``backoff_s``, doubling), say so
    in one line, and call again for the failed items only; at most ``retries`` times. Returns the
    results, failures and all (the caller masks and counts them)."""
    out = list(call(items))
    for attempt in range(retries):
        bad = [i for i, r in enumerate(out) if failed(r)]
        if not bad or len(bad) <= max_rate * len(out):
            break
        wait = backoff_s * 2 ** attempt
        say(f"{what}: {len(bad)} of {len(out)} failed ({reason(out[bad[0]])[:200]}); retrying them in "
            f"{wait:g} s ({attempt + 1} of {retries})")
        time.sleep(wait)
        for i, r in zip(bad, call([items[i] for i in bad])):
            out[i] = r
    return out


class RetryingJudge:
    """A judge whose outages are retried (:func:`retry_outage` over ``judge_many``); everything
    else is the wrapped judge's."""

    def __init__(self, judge, max_rate: float, retries: int, backoff_s: float):
        self.judge, self.max_rate, self.retries, self.backoff_s = judge, max_rate, retries, backoff_s

    def judge_many(self, pairs, progress=None):
        many = getattr(self.judge, "judge_many", None) or (lambda ps: [self.judge.judge(p, a) for p, a in ps])
        return retry_outage(many, list(pairs), lambda j: j.verdict.status == "judge_error", _judge_reason,
                            "judge", self.max_rate, self.retries, self.backoff_s)

    def __getattr__(self, name):
        return getattr(self.judge, name)


def _judge_reason(judgement) -> str:
    details = judgement.verdict.details
    return (details[0].error if details and details[0].error else "") or "judge_error"


class RetryingTeacher:
    """A served teacher whose outages are retried (:func:`retry_outage` over its rows; a row's
    failure is None); everything else is the wrapped teacher's."""

    def __init__(self, teacher, max_rate: float, retries: int, backoff_s: float):
        self.teacher, self.max_rate, self.retries, self.backoff_s = teacher, max_rate, retries, backoff_s

    def score(self, prompt_ids: list, response_ids: list) -> list:
        def call(rows):
            return self.teacher.score([p for p, _ in rows], [r for _, r in rows])

        where = f"teacher at {getattr(self.teacher, 'base_url', '?')}"
        return retry_outage(call, list(zip(prompt_ids, response_ids)), lambda r: r is None,
                            lambda r: "no scores (timeout, connection or HTTP error)", where, self.max_rate,
                            self.retries, self.backoff_s)

    def __getattr__(self, name):
        return getattr(self.teacher, name)

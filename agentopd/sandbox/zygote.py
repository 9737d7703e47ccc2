"""Run one program under limits and collect its output; stdlib only.

This file is used twice: imported on the host (``collect``/``rlimits``) by the cold backends, and
run as a script inside a sandbox (bwrap, docker) as a *warm worker*: it reads one request at a time
on stdin (a JSON header line, then the program's and its stdin's bytes, which it splices into
files), runs the program in a child forked from this already-started interpreter (forked
*before* the request came, between requests, so the fork is off the caller's wait), and answers
one JSON line. A call-style run (the tests of agentopd/sandbox/calltests.py) costs one fork too:
the child is the candidate, and the worker's *helper*, a long-lived process forked from the
worker before any program ran, holds the tests (spliced to it past the worker's memory), calls
the candidate over pipes and writes the results, on pipes the candidate never holds. Between
requests the worker kills every process it can signal in its namespace but the helper, and the
helper empties every writable place and drops SysV IPC objects, so one program cannot see or
touch the next one's files, processes or memory. Both are non-dumpable, so a program cannot
ptrace them or read their memory or fds.
"""
import json
import os
import resource
import select
import signal
import sys
import time

MB = 1 << 20


def cpu_seconds(lim) -> int:
    """A program's CPU-time limit (RLIMIT_CPU, whole seconds rounded up): ``cpu_s``, else the wall
    limit + 1."""
    return max(1, -int(-float(lim.get("cpu_s") or lim["timeout_s"] + 1) // 1))


def rlimits(lim):
    """Set the per-program resource limits of ``lim`` (a dict) on the calling process."""
    cpu = cpu_seconds(lim)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = lim["memory_mb"] * MB
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize_mb"] * MB,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if lim.get("nproc"):
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"],) * 2)


def _kill_and_wait(pid):
    """SIGKILL ``pid`` and its process group; its wait status."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return os.waitpid(pid, 0)[1]


def collect(pid, out_fd, err_fd, deadline, cap, exit_128_is_signal=False, sinks=None):
    """Read the child's stdout/stderr until it exits (or the deadline / output cap); kill its group
    when it overruns. Returns a result dict (exit_code, signal, stdout, stderr, flags).
    ``exit_128_is_signal``: the child is a wrapper (bwrap, a shell) that reports a program killed
    by signal N as exit code 128 + N. ``sinks``: {pipe fd: file fd} to splice the output into
    (kernel to kernel, never through this process's memory) instead of returning it. ``pid``
    None: no process to wait for (a warm worker's helper writes the output, and the run ends when
    it closes the pipes)."""
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    counts = {out_fd: 0, err_fd: 0}
    open_fds = [out_fd, err_fd]
    status = None
    timed_out = truncated = False
    while open_fds:
        if status is None and pid is not None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = status is None
            break
        ready, _, _ = select.select(open_fds, [], [], min(left, 0.02))
        if not ready and status is not None:
            break  # the child is gone; only a stray process still holds a pipe open
        for fd in ready:
            if sinks:
                n = os.splice(fd, sinks[fd], 65536)
            else:
                chunk = os.read(fd, 65536)
                bufs[fd] += chunk
                n = len(chunk)
            if not n:
                open_fds.remove(fd)
                continue
            counts[fd] += n
            if counts[fd] > cap:
                truncated = True
        if truncated:
            break
    if pid is None:
        status = 0
    elif status is None:
        status = _kill_and_wait(pid)
    for fd in (out_fd, err_fd):
        os.close(fd)
    if sinks:
        for fd in sinks.values():
            if os.fstat(fd).st_size > cap:
                os.ftruncate(fd, cap)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if sig is None else -sig
    if sig is None and exit_128_is_signal and 128 < code < 128 + 65:
        sig, code = code - 128, 128 - code
    if sig == signal.SIGXCPU:
        timed_out = True
    res = {
        "exit_code": code,
        "signal": sig,
        "timed_out": timed_out,
        "truncated": truncated,
        "oom": sig == signal.SIGKILL and not timed_out and not truncated,
    }
    if not sinks:
        res["stdout"] = bytes(bufs[out_fd][:cap]).decode("utf-8", "replace")
        res["stderr"] = bytes(bufs[err_fd][:cap]).decode("utf-8", "replace")
    return res


# ---------------------------------------------------------------- the warm worker (in a sandbox)


def _exit_code(exc):
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _enter(lim):
    """In a forked child, before it becomes a program: its own session, its limits, and ``random``
    seeded with 0 (not the fresh seed of random's own after-fork hook: the same program draws the
    same numbers, so its verdict depends on it alone). (Default signal actions, set in the worker,
    it has already.)"""
    os.setsid()
    rlimits(lim)
    if "random" in sys.modules:
        sys.modules["random"].seed(0)


_STREAMS = []  # sys.stdin/stdout/stderr for programs, made once in the worker (which never uses them)


def _child(path, stdin_path, out_w, err_w, lim):
    """In the forked child: become a fresh ``python main.py`` as far as the program can tell."""
    fd = os.open(stdin_path, os.O_RDONLY)
    os.unlink(stdin_path)
    os.dup2(fd, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.closerange(3, 1 << 16)
    _enter(lim)
    sys.stdin, sys.stdout, sys.stderr = _STREAMS
    sys.argv = [path]
    sys.path[0] = os.path.dirname(path)
    code = 0
    try:
        with open(path, encoding="utf-8") as f:
            code_obj = compile(f.read(), path, "exec")
        exec(code_obj, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException as e:
        import traceback

        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the program's frame on
        code = 1
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        code = code or 120
    os._exit(code)


def _reap_all(keep=None):
    """Kill every process this worker can signal in its namespace but itself (and ``keep``, its
    helper, when the worker is pid 1), and reap them. False when ``keep`` is dead."""
    if keep is None or os.getpid() != 1:  # kill(-1) spares only the caller and pid 1
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return keep is None
    alive, left = True, True
    while left:
        left = False
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) not in (1, keep):
                try:
                    os.kill(int(name), signal.SIGKILL)
                    left = True  # (a zombie too, until it is reaped below)
                except OSError:
                    pass
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            alive = alive and pid != keep
        if left:
            time.sleep(0.0001)
    return alive


def _rm(p):
    """Remove ``p`` and everything under it, opening up directories a program chmod-ed shut."""
    try:
        st = os.lstat(p)
    except OSError:
        return
    if st.st_mode & 0o170000 != 0o040000:  # not a directory
        try:
            os.unlink(p)
        except OSError:
            pass
        return
    try:
        os.chmod(p, 0o700)
    except OSError:
        pass
    try:
        names = os.listdir(p)
    except OSError:
        names = []
    for name in names:
        _rm(os.path.join(p, name))
    try:
        os.rmdir(p)
    except OSError:
        pass


_LIBC = []


def _clean(dirs):
    """Empty the writable places and drop SysV IPC objects; 0 when nothing of ours is left."""
    if not _LIBC:  # (the helper cleans after every program: ctypes' set-up once)
        import ctypes

        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    libc = _LIBC[0]
    for kind, ctl in (("shm", libc.shmctl), ("sem", libc.semctl), ("msg", libc.msgctl)):
        try:
            with open("/proc/sysvipc/" + kind) as f:
                ids = [int(line.split()[1]) for line in list(f)[1:]]
        except (OSError, ValueError, IndexError):
            ids = []
        for i in ids:
            ctl(i, 0, 0)  # IPC_RMID
    uid = os.getuid()
    for d, mode in dirs.items():
        if mode is not None:
            try:
                os.chmod(d, mode)
            except OSError:
                pass
        try:
            for name in os.listdir(d):
                _rm(os.path.join(d, name))
            if any(os.lstat(os.path.join(d, name)).st_uid == uid for name in os.listdir(d)):
                return 1
        except OSError:
            return 1
    return 0


def _header(req_fd):
    """The next request's header: a short line ``{"header": <size>}`` read a byte at a time (past
    its first 14, which every such line has), then exactly that many bytes; not one byte of the
    program or its stdin that follow enters this process. None when there are no more requests."""
    buf = bytearray()
    while not buf.endswith(b"\n"):  # the shortest line, {"header": 1} and its newline, is 14 bytes
        byte = os.read(req_fd, max(1, 14 - len(buf)))
        if not byte:
            return None
        buf += byte
    size, head = json.loads(buf)["header"], b""
    while len(head) < size:
        chunk = os.read(req_fd, size - len(head))
        if not chunk:
            return None
        head += chunk
    return json.loads(head)


def _splice(req_fd, fd, n):
    """Move ``n`` bytes of the request stream into ``fd``, kernel to kernel; what a pipe whose
    reader went away does not take goes to /dev/null, so the stream stays in step."""
    null = None
    try:
        while n > 0:
            try:
                moved = os.splice(req_fd, null or fd, n)
            except BrokenPipeError:
                null = os.open(os.devnull, os.O_WRONLY)
                continue
            if not moved:
                raise EOFError("the request ended early")
            n -= moved
    finally:
        if null is not None:
            os.close(null)


def _splice_to(req_fd, path, n):
    """Move ``n`` bytes of the request stream into the file ``path``, kernel to kernel."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _splice(req_fd, fd, n)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------- the helper


def _helper(ctl, calls, dirs):
    """The warm worker's helper, forked from the worker before any program ran, and alive from
    one run to the next: for a call-style run it runs the tests (``calls["drive"]``, from
    agentopd/sandbox/calltests.py) against the candidate the worker forked, and between runs it
    empties the writable places. No program is ever forked from it, so what it reads (tests, the
    file names programs left) never reaches one; like the worker it is non-dumpable (no ptrace,
    no /proc/<pid>/{mem,fd} for programs), and it never imports from a writable directory."""
    import socket

    os.chdir("/")
    sys.path[:] = [p for p in sys.path if p.startswith("/usr/")]
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctl, 1 << 16, 8)
        except OSError:
            return 1
        if not msg:
            return 0
        req = json.loads(msg)
        ok = _clean(dirs) == 0 if req.get("clean") else _drive(calls["drive"], req, fds)
        ctl.send(b"1" if ok else b"0")
        if not ok:
            return 1


def _drive(drive, req, fds):
    """One call-style run in the helper: its output on the run's pipes, its memory limited; a
    failure of the driver's own (a traceback on the run's stderr) ends the helper."""
    tests_r, cmd_w, rep_r, out_w, err_w = fds
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (req["memory_mb"] * MB, hard))
    ok = True
    try:
        drive(cmd_w, rep_r, tests_r)
    except BaseException:
        import traceback

        traceback.print_exc()
        ok = False
    try:
        sys.stderr.flush()
    except BaseException:
        ok = False
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (1, 2):
        os.dup2(null, fd)  # the run's output ends here: its pipes close
    for fd in (null, *fds):
        os.close(fd)
    return ok


class _Helper:
    """The worker's helper process (:func:`_helper`) and its control socket."""

    def __init__(self, calls, dirs, close):
        import socket

        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                mine.close()
                for fd in close:
                    os.close(fd)
                code = _helper(theirs, calls, dirs)
            finally:
                os._exit(code)
        theirs.close()
        self.ctl, self.candidate = mine, calls["candidate"]

    def ask(self, req, fds=()):
        """Send a request (and fds to keep); False when the helper is gone."""
        import socket

        try:
            return socket.send_fds(self.ctl, [json.dumps(req).encode()], list(fds)) > 0
        except OSError:
            return False

    def answer(self, deadline):
        """True: done; False: it failed (and ends), it is gone, or no answer came in time."""
        if not select.select([self.ctl], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return False
        try:
            return self.ctl.recv(1) == b"1"
        except OSError:
            return False

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except OSError:
            pass
        self.ctl.close()


# ------------------------------------------------------------------------------------ a run


def _become_program(lim, out, call, work, candidate):
    """In a child of the worker: become the program the worker wrote to ``run/main.py``; in a
    call-style run, the candidate that loads the program and answers the helper's calls on the
    pipes ``call``."""
    path, stdin_path = os.path.join(work, "run", "main.py"), os.path.join(work, ".stdin")
    if not lim.get("call"):
        _child(path, stdin_path, *out, lim)
    os.unlink(stdin_path)
    with open(path, encoding="utf-8") as f:
        program = json.load(f)
    _enter(lim)
    sys.argv = [path]
    candidate(*call, program["src"], program.get("setup", ""))
    os._exit(0)


def _request(req_fd, work):
    """The next request's header, with its program and stdin spliced into files (its tests, for
    a call-style run, are still to come). None when there are no more, or it is broken."""
    try:
        head = _header(req_fd)
        if head is not None:
            os.mkdir(os.path.join(work, "run"))
            _splice_to(req_fd, os.path.join(work, "run", "main.py"), head["sizes"][0])
            _splice_to(req_fd, os.path.join(work, ".stdin"), head["sizes"][1])
        return head
    except (OSError, ValueError, EOFError, KeyError, TypeError):  # a broken request: this worker ends
        return None


def _to_helper(helper, head, req_fd, cmd_w, rep_r):
    """Hand a call-style run to the helper: the ends of the candidate's pipes, a pipe for the
    tests (spliced into it from the request, past this process's memory) and the run's output
    pipes, which no program holds. Their read ends; None when the helper is gone."""
    tests_r, tests_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    fds = (tests_r, cmd_w, rep_r, out_w, err_w)
    sent = helper.ask({"memory_mb": head["limits"]["memory_mb"]}, fds)
    for fd in fds:
        os.close(fd)
    try:
        _splice(req_fd, tests_w, head["sizes"][2])
    except (OSError, EOFError, IndexError):
        sent = False
    os.close(tests_w)
    if not sent:
        os.close(out_r)
        os.close(err_r)
        return None
    return out_r, err_r


class _Spare:
    """The next program's process, forked from the worker before its request came (so the fork is
    off the caller's wait, and the child's memory is the worker's between requests: no program,
    stdin or test of any run). It waits for its run's limits on a pipe, then becomes the program
    (:func:`_become_program`). Its pipes: stdout, stderr, and a call-style run's calls/replies."""

    def __init__(self, work, candidate, keep_closed):
        pipes = [os.pipe() for _ in range(5)]
        (self.out_r, self.out_w), (self.err_r, self.err_w), (self.cmd_r, self.cmd_w), (self.rep_r, self.rep_w), \
            (go_r, self.go_w) = pipes
        self.pid = os.fork()
        if self.pid == 0:
            try:
                for fd in (self.out_r, self.err_r, self.go_w, *keep_closed):
                    os.close(fd)
                lim = _read_all(go_r)
                if lim:
                    _become_program(json.loads(lim), (self.out_w, self.err_w), (self.cmd_r, self.rep_w), work,
                                    candidate)
            finally:
                os._exit(121)
        for fd in (go_r, self.out_w, self.err_w, self.cmd_r, self.rep_w):
            os.close(fd)

    def go(self, lim):
        """Start the run under ``lim`` (its ``call`` flag included)."""
        os.write(self.go_w, json.dumps(lim).encode())
        os.close(self.go_w)

    def cancel(self):
        """No run for it: it sees no limits and exits."""
        os.close(self.go_w)
        os.waitpid(self.pid, 0)

    def discard(self):
        """No request came: its pipes closed, and :meth:`cancel`."""
        for fd in (self.out_r, self.err_r, self.cmd_w, self.rep_r):
            os.close(fd)
        self.cancel()


def _read_all(fd):
    """Everything ``fd`` gives until its writer closes it; ``fd`` is closed."""
    data = b""
    while chunk := os.read(fd, 1 << 16):
        data += chunk
    os.close(fd)
    return data


def _run_one(req_fd, sinks, work, helper, spare):
    """Read the next request and collect its program, the ``spare`` forked before it from this
    process, whose memory never holds a program, its stdin or tests: the header is read byte by
    byte and the rest spliced into files and pipes. In a call-style run the child is the candidate
    and the helper's output is the run's. None when there are no more requests (or the helper is
    gone)."""
    head = _request(req_fd, work)
    if head is None:
        spare.discard()
        return None
    call = bool(head.get("call"))
    out_r, err_r = spare.out_r, spare.err_r
    if call:
        outputs = _to_helper(helper, head, req_fd, spare.cmd_w, spare.rep_r)  # closes them
        os.close(out_r)
        os.close(err_r)
        if outputs is None:
            spare.cancel()
            return None
        out_r, err_r = outputs
    else:
        os.close(spare.cmd_w)
        os.close(spare.rep_r)
    spare.go({**head["limits"], "call": call})
    return _collect_run(spare.pid, head["limits"], out_r, err_r, sinks, helper if call else None)


def _collect_run(pid, lim, out_r, err_r, sinks, helper):
    """The run's result: the program's output (or, in a call-style run, the helper's: then the run
    ends when the helper closes its pipes, and ``helper_ok`` says whether it can serve the next)."""
    t0 = time.monotonic()
    deadline = t0 + lim["timeout_s"]
    fds = list(sinks.values())
    res = collect(None if helper else pid, out_r, err_r, deadline, lim["output_bytes"],
                  sinks=dict(zip((out_r, err_r), fds)))
    if helper is not None:
        ok = not res["timed_out"] and not res["truncated"] and helper.answer(deadline + 1.0)
        res["helper_ok"], res["exit_code"] = ok, 0 if ok else 1
        res["timed_out"] = res["timed_out"] or _used_its_cpu(pid, lim)
    res["duration_s"] = time.monotonic() - t0
    res["attach"] = [os.fstat(fd).st_size for fd in fds]
    return res


def _used_its_cpu(pid, lim) -> bool:
    """Whether the program ``pid`` (this worker's child) was ended by its CPU-time limit (SIGXCPU, or
    the hard limit's SIGKILL): a call-style run's timeout, though the helper saw only that its
    process ended. Only a program that used at least 95% of its limit (the scheduler's count, the
    clock RLIMIT_CPU uses) is waited for, a second at most: one still alive then was not ended."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as f:
            used = int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return False
    if used < 0.95 * cpu_seconds(lim):
        return False
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return False
        if done:
            return os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGXCPU, signal.SIGKILL)
        time.sleep(0.002)
    return False


# modules most programs import: loaded once here, so a forked program does not pay for them
_PRELOAD = ("typing", "collections", "re", "math", "itertools", "functools", "heapq", "bisect", "string",
            "traceback", "ast", "copy", "random", "fractions", "operator", "dataclasses", "socket")


def _setup(work):
    """The worker's process state before it serves: non-dumpable, modules preloaded, the GC
    frozen, the request and reply streams on private fds (0 and 1 become /dev/null). Returns
    (request fd, reply fd, the writable places and their modes)."""
    import ctypes
    import gc
    import importlib

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0: no ptrace, no /proc/<pid>/{mem,fd} for others
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back to us (if not pid 1)
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    gc.freeze()  # the collector leaves what is loaded now alone: fewer copy-on-write pages per program
    os.chdir(work)
    req_fd = os.dup(0)
    reply = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    for fd in (req_fd, reply):
        os.set_inheritable(fd, False)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)  # as a program would find them
    _STREAMS[:] = [open(0, "r", closefd=False, encoding="utf-8", errors="surrogateescape"),
                   open(1, "w", closefd=False, encoding="utf-8", errors="backslashreplace"),
                   open(2, "w", closefd=False, encoding="utf-8", errors="backslashreplace")]
    dirs = {}
    for d in (work, "/tmp", "/dev/shm", "/dev/mqueue"):
        if os.path.isdir(d) and os.access(d, os.W_OK):
            st = os.stat(d)
            dirs[d] = st.st_mode & 0o7777 if st.st_uid == os.getuid() else None
    return req_fd, reply, dirs


def _reply(reply, res, sinks):
    """The result line, then the raw stdout and stderr it announces, sent kernel to kernel from the
    memfds: the output never passes through this process."""
    os.write(reply, json.dumps(res).encode() + b"\n")
    for fd, size in zip(sinks, res["attach"]):
        off = 0
        while off < size:
            off += os.sendfile(reply, fd, off, size - off)


def serve(work, driver_src):
    """The warm worker, meant to be pid 1 of its sandbox (programs cannot signal it). No program,
    stdin or test ever passes through its memory: it reads a request's header a byte at a time
    and splices the rest into files (and a call-style run's tests into a pipe to its helper), a
    child forked before the request came becomes the program, and the program's output is
    spliced into memfds and sent on with sendfile, so no program inherits memory holding an
    earlier program's stdin or output. After each program it replies (a JSON line, then the raw
    stdout and stderr bytes it announces) and only then, off the caller's wait, kills every
    process left but its helper and has the helper empty the writable places before the next
    request; when that fails, it exits (the pool starts a fresh sandbox). ``driver_src``:
    agentopd/sandbox/calltests.py as a program."""
    if os.getuid() == 0:
        sys.exit("agentopd worker: refusing to run as root (it kills every process it can signal)")
    calls = {"__name__": "agentopd_calltests"}
    exec(compile(driver_src, os.path.join(work, "run", "main.py"), "exec"), calls)  # defines, runs nothing
    req_fd, reply, dirs = _setup(work)
    sinks = [os.memfd_create(n, os.MFD_CLOEXEC) for n in ("stdout", "stderr")]
    os.write(reply, b'{"ready": true}\n')
    helper = None
    while True:
        helper = helper or _Helper(calls, dirs, (req_fd, reply, *sinks))
        for fd in sinks:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        spare = _Spare(work, helper.candidate, (req_fd, reply, *sinks))
        res = _run_one(req_fd, dict(enumerate(sinks)), work, helper, spare)
        if res is None:
            helper.kill()
            return
        helper_ok = res.pop("helper_ok", True)
        _reply(reply, res, sinks)  # the run's result is complete: what is left of it cannot change it
        if not _reap_all(helper.pid) or not helper_ok:
            helper.kill()
            helper = None
        else:
            os.kill(helper.pid, signal.SIGCONT)  # a program may have stopped it
        helper = helper or _Helper(calls, dirs, (req_fd, reply, *sinks))
        if not (helper.ask({"clean": True}) and helper.answer(time.monotonic() + 10.0)):
            return


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else "/work", sys.argv[2])

"""Run one program under limits and collect its output; stdlib only.

This file is used twice: imported on the host (``collect``/``rlimits``) by the cold backends, and
run as a script inside a sandbox (bwrap, docker) as a *warm worker*: it reads one request at a time
on stdin (a JSON header line, then the program's and its stdin's bytes, which it splices into
files), runs the program in a child forked from this already-started interpreter, and answers
one JSON line. Programs named in its command line are compiled once, at start. Between requests it kills every process it can signal in
its namespace, empties every writable place and drops SysV IPC objects, so one program cannot see
or touch the next one's files, processes or memory. It makes itself non-dumpable, so a program
cannot ptrace it or read its memory or fds.
"""
import json
import os
import resource
import select
import signal
import sys
import time

MB = 1 << 20


def rlimits(lim):
    """Set the per-program resource limits of ``lim`` (a dict) on the calling process."""
    cpu = int(lim.get("cpu_s") or lim["timeout_s"] + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = lim["memory_mb"] * MB
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize_mb"] * MB,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if lim.get("nproc"):
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"],) * 2)


def collect(pid, out_fd, err_fd, deadline, cap, exit_128_is_signal=False, sinks=None):
    """Read the child's stdout/stderr until it exits (or the deadline / output cap); kill its group
    when it overruns. Returns a result dict (exit_code, signal, stdout, stderr, flags).
    ``exit_128_is_signal``: the child is a wrapper (bwrap, a shell) that reports a program killed
    by signal N as exit code 128 + N. ``sinks``: {pipe fd: file fd} to splice the output into
    (kernel to kernel, never through this process's memory) instead of returning it."""
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    counts = {out_fd: 0, err_fd: 0}
    open_fds = [out_fd, err_fd]
    status = None
    timed_out = truncated = False
    while open_fds:
        if status is None:
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
    if status is None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        _, status = os.waitpid(pid, 0)
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


def _child(path, stdin_path, out_w, err_w, lim, code_obj=None):
    """In the forked child: become a fresh ``python main.py`` as far as the program can tell
    (``code_obj``: the program, compiled already)."""
    os.setsid()
    fd = os.open(stdin_path, os.O_RDONLY)
    os.unlink(stdin_path)
    os.dup2(fd, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.closerange(3, 1 << 16)
    rlimits(lim)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(s, signal.SIG_DFL)
    sys.stdin = open(0, "r", closefd=False, encoding="utf-8", errors="surrogateescape")
    sys.stdout = open(1, "w", closefd=False, encoding="utf-8", errors="backslashreplace")
    sys.stderr = open(2, "w", closefd=False, encoding="utf-8", errors="backslashreplace")
    sys.argv = [path]
    sys.path[0] = os.path.dirname(path)
    if "random" in sys.modules:  # a fresh seed, as a new interpreter would have
        sys.modules["random"].seed()
    code = 0
    try:
        if code_obj is None:
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


def _reap_all():
    """Kill every process this worker can signal in its namespace (all but itself when it is
    pid 1), and reap them."""
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _forked(fn, *args):
    """Run ``fn(*args)`` in a forked child and return its exit code. What the child reads (a
    request, a program's output, file names) never enters this process's memory, which every
    later program is forked from."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn(*args)
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


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


def _clean(dirs):
    """Empty the writable places and drop SysV IPC objects; 0 when nothing of ours is left."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
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
    """The next request's header: a short line ``{"header": <size>}`` read a byte at a time, then
    exactly that many bytes; not one byte of the program or its stdin that follow enters this
    process. None when there are no more requests."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        byte = os.read(req_fd, 1)
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


def _splice_to(req_fd, path, n):
    """Move ``n`` bytes of the request stream into the file ``path``, kernel to kernel."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while n > 0:
            moved = os.splice(req_fd, fd, n)
            if not moved:
                raise EOFError("the request ended early")
            n -= moved
    finally:
        os.close(fd)


def _become_program(go_r, out_w, err_w, work, known):
    """In a child of the worker, forked before the request came: wait for its limits, then
    become the program the worker wrote to ``run/main.py`` (or a known one, compiled already)."""
    raw = b""
    while chunk := os.read(go_r, 4096):
        raw += chunk
    if not raw:
        os._exit(0)
    lim = json.loads(raw)
    code = known[lim["known"]] if lim.get("known") is not None else None
    _child(os.path.join(work, "run", "main.py"), os.path.join(work, ".stdin"), out_w, err_w, lim, code)


def _run_one(req_fd, sinks, work, known):
    """Read the next request and collect its program, forked before the request came (so the
    fork costs no time) from this process, whose memory never holds a program or its stdin: the
    header is read byte by byte and the rest spliced into files. None when there are no more."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (out_r, err_r, go_w, *sinks.values()):
                os.close(fd)
            _become_program(go_r, out_w, err_w, work, known)
        finally:
            os._exit(121)
    for fd in (out_w, err_w, go_r):
        os.close(fd)
    try:
        head = _header(req_fd)
        if head is not None:
            os.mkdir(os.path.join(work, "run"))
            _splice_to(req_fd, os.path.join(work, "run", "main.py"), head["sizes"][0])
            _splice_to(req_fd, os.path.join(work, ".stdin"), head["sizes"][1])
    except (OSError, ValueError, EOFError, KeyError, TypeError):  # a broken request: this worker ends
        head = None
    if head is not None:
        os.write(go_w, json.dumps({**head["limits"], "known": head.get("known")}).encode())
    os.close(go_w)
    t0 = time.monotonic()
    if head is None:
        os.waitpid(pid, 0)
        for fd in (out_r, err_r):
            os.close(fd)
        return None
    lim = head["limits"]
    fds = list(sinks.values())
    res = collect(pid, out_r, err_r, t0 + lim["timeout_s"], lim["output_bytes"], sinks=dict(zip((out_r, err_r), fds)))
    res["duration_s"] = time.monotonic() - t0
    res["attach"] = [os.fstat(fd).st_size for fd in fds]
    return res


# modules most programs import: loaded once here, so a forked program does not pay for them
_PRELOAD = ("typing", "collections", "re", "math", "itertools", "functools", "heapq", "bisect", "string",
            "traceback", "ast", "copy", "random", "fractions", "operator", "dataclasses")


def serve(work, known_srcs=()):
    """The warm worker, meant to be pid 1 of its sandbox (programs cannot signal it). No program
    or stdin ever passes through its memory: it reads a request's header a byte at a time and
    splices the rest into files, a child forked before the request came becomes the program, and
    the program's output is spliced into memfds and sent on with sendfile, so no program inherits
    memory holding an earlier program's stdin or output. After each program it replies (a JSON
    line, then the raw stdout and stderr bytes it announces), kills every process left and empties
    the writable places before the next request; when it cannot, it exits (the pool starts a
    fresh sandbox)."""
    import ctypes
    import importlib

    if os.getuid() == 0:
        sys.exit("agentopd worker: refusing to run as root (it kills every process it can signal)")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0: no ptrace, no /proc/<pid>/{mem,fd} for others
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back to us (if not pid 1)
    known = [compile(src, os.path.join(work, "run", "main.py"), "exec") for src in known_srcs]
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    import gc

    gc.freeze()  # the collector leaves what is loaded now alone: fewer copy-on-write pages per program
    os.chdir(work)
    req_fd = os.dup(0)
    reply = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    for fd in (req_fd, reply):
        os.set_inheritable(fd, False)
    dirs = {}
    for d in (work, "/tmp", "/dev/shm", "/dev/mqueue"):
        if os.path.isdir(d) and os.access(d, os.W_OK):
            st = os.stat(d)
            dirs[d] = st.st_mode & 0o7777 if st.st_uid == os.getuid() else None
    sinks = [os.memfd_create(n, os.MFD_CLOEXEC) for n in ("stdout", "stderr")]
    os.write(reply, b'{"ready": true}\n')
    while True:
        for fd in sinks:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        res = _run_one(req_fd, dict(enumerate(sinks)), work, known)
        _reap_all()
        if res is None:
            return
        os.write(reply, json.dumps(res).encode() + b"\n")
        for fd, size in zip(sinks, res["attach"]):
            off = 0
            while off < size:  # kernel to kernel: the output never passes through this process
                off += os.sendfile(reply, fd, off, size - off)
        if _forked(_clean, dirs) != 0:
            return


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else "/work", sys.argv[2:])

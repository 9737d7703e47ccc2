"""Run one program under limits and collect its output; stdlib only.

This file is used twice: imported on the host (``collect``/``rlimits``) by the cold backends, and
run as a script inside a sandbox (bwrap, docker) as a *warm worker*: it reads one JSON request per
line on stdin, forks a child per request that runs the program in this already-started
interpreter, and answers one JSON line. Between requests it kills every process it can signal in
its namespace and wipes the work dir, so one program cannot see or touch the next one's files or
processes. It makes itself non-dumpable, so a program cannot ptrace it or read its memory or fds.
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


def collect(pid, out_fd, err_fd, deadline, cap):
    """Read the child's stdout/stderr until it exits (or the deadline / output cap); kill its group
    when it overruns. Returns a result dict (exit_code, signal, stdout, stderr, flags)."""
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
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
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
                continue
            bufs[fd] += chunk
            if len(bufs[fd]) > cap:
                del bufs[fd][cap:]
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
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    if sig == signal.SIGXCPU:
        timed_out = True
    stderr = bufs[err_fd].decode("utf-8", "replace")
    oom = "MemoryError" in stderr[-2000:] or (sig == signal.SIGKILL and not timed_out and not truncated)
    return {
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else -sig,
        "signal": sig,
        "stdout": bufs[out_fd].decode("utf-8", "replace"),
        "stderr": stderr,
        "timed_out": timed_out,
        "truncated": truncated,
        "oom": oom and not timed_out,
    }


# ---------------------------------------------------------------- the warm worker (in a sandbox)


def _exit_code(exc):
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _child(path, stdin_path, out_w, err_w, lim):
    """In the forked child: become a fresh ``python main.py`` as far as the program can tell."""
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
    code = 0
    try:
        with open(path, encoding="utf-8") as f:
            src = f.read()
        exec(compile(src, path, "exec"), {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:
        import traceback

        traceback.print_exc()
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
    """Kill every process this worker can signal in its namespace (not itself, not pid 1)."""
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _wipe(path):
    import shutil

    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass


def serve(work):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0: no ptrace, no /proc/<pid>/{mem,fd} for others
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back to us to be reaped
    req_in = os.fdopen(os.dup(0), "rb")
    reply = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.set_inheritable(req_in.fileno(), False)
    os.set_inheritable(reply, False)
    os.write(reply, b'{"ready": true}\n')
    for line in req_in:
        req = json.loads(line)
        lim = req["limits"]
        for d in (work, "/tmp"):
            _wipe(d)
        rundir = os.path.join(work, "run")
        os.mkdir(rundir)
        path = os.path.join(rundir, req.get("filename", "main.py"))
        with open(path, "w", encoding="utf-8") as f:
            f.write(req["program"])
        stdin_path = os.path.join(work, ".stdin")
        with open(stdin_path, "wb") as f:
            f.write(req.get("stdin", "").encode("utf-8", "surrogateescape"))
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(out_r)
                os.close(err_r)
                _child(path, stdin_path, out_w, err_w, lim)
            finally:
                os._exit(121)
        os.close(out_w)
        os.close(err_w)
        res = collect(pid, out_r, err_r, t0 + lim["timeout_s"], lim["output_bytes"])
        res["duration_s"] = time.monotonic() - t0
        _reap_all()
        os.write(reply, json.dumps(res).encode() + b"\n")


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else "/work")

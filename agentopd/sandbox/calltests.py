"""Call-style tests in two processes: a driver that holds the tests and a candidate that holds the
program; stdlib only.

On its own (``main``: a cold run's program, its stdin a framed request), the driver reads the
program (the first frame of stdin), makes itself non-dumpable (no ptrace, no
``/proc/<pid>/{mem,fd}`` for the candidate) and forks the candidate, which keeps nothing of the
driver's but two pipes: calls in, replies out (its stdin, stdout and stderr are /dev/null). Only
then does the driver read the tests (the rest of stdin). In a warm worker (``drive``), the
driver is the worker's long-lived, non-dumpable helper and the candidate a child forked from the
worker, which never held the tests (agentopd/sandbox/zygote.py). Either way the driver runs the
tests in its own namespace, where a name the tests do not define (the entry point, a helper of
the prompt) is a proxy that calls the candidate: arguments and return values cross as data (a
tagged JSON of builtin values), so a rigged ``__eq__`` cannot cross, and the comparisons are the
driver's. The driver alone writes results, one JSON line each, to the run's stdout, which the
candidate does not hold: nothing it prints, patches or finds in its memory or files reaches them.
"""
# ruff: noqa: S102, S110, BLE001 -- it runs programs and tests: every failure of theirs is a result
import builtins
import json
import os
import sys

REPLY_CAP = 1 << 24  # bytes of one candidate reply; more is an output limit


# ------------------------------------------------------------------ values as data (both sides)

_TAGS = {tuple: "t", set: "s", frozenset: "f"}
_UNTAG = {"t": tuple, "s": set, "f": frozenset}


def encode(x, ref=None):
    """A builtin value as JSON-able data: lists stay lists, tuples/sets/dicts/bytes are tagged.
    ``ref(x)`` stands in for anything else (None: TypeError)."""
    if x is None or type(x) in (bool, str, float) or (type(x) is int and x.bit_length() < 10000):
        return x
    for base in (bool, int, float, str):  # subclasses (enums, ...) cross as their plain value
        if isinstance(x, base):
            return {"i": hex(x)} if base is int else base(x)
    if isinstance(x, list):
        return [encode(v, ref) for v in x]
    if isinstance(x, (tuple, set, frozenset)):
        tag = next(t for k, t in _TAGS.items() if isinstance(x, k))
        return {tag: [encode(v, ref) for v in x]}
    if isinstance(x, dict):
        return {"d": [[encode(k, ref), encode(v, ref)] for k, v in x.items()]}
    if isinstance(x, (bytes, bytearray)):
        return {"b": bytes(x).hex()}
    if isinstance(x, complex):
        return {"c": [x.real, x.imag]}
    if ref is None:
        raise TypeError(f"a {type(x).__name__} cannot be sent as data")
    return {"r": ref(x)}


def decode(x, deref):
    """The value :func:`encode` made; ``deref(tag_value)`` for stand-ins."""
    if isinstance(x, list):
        return [decode(v, deref) for v in x]
    if not isinstance(x, dict):
        return x
    (tag, v), = x.items()
    if tag in _UNTAG:
        return _UNTAG[tag](decode(e, deref) for e in v)
    if tag == "d":
        return {decode(k, deref): decode(e, deref) for k, e in v}
    if tag == "i":
        return int(v, 16)
    if tag == "b":
        return bytes.fromhex(v)
    if tag == "c":
        return complex(*v)
    return deref(v)


def _send(fd, obj):
    data = (json.dumps(obj) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


class _Lines:
    """Newline-framed reads from a pipe, each line at most ``cap`` bytes."""

    def __init__(self, fd, cap=REPLY_CAP):
        self.fd, self.cap, self.buf = fd, cap, b""

    def read(self, n=None):
        """One line (without its newline), or exactly ``n`` bytes; None at end of file."""
        while (b"\n" not in self.buf) if n is None else (len(self.buf) < n):
            if len(self.buf) > self.cap:
                raise OverflowError("the program's reply is too long")
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        if n is None:
            line, _, self.buf = self.buf.partition(b"\n")
            return line
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


# ------------------------------------------------------------------------------- the candidate


def _err(e):
    return [type(e).__name__, str(e)[:1000]]


def candidate(cmd_fd, rep_fd, src, setup):
    """In the forked child: load the program, then answer calls until the driver closes the pipe."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    a, b = sorted((cmd_fd, rep_fd))
    for lo, hi in ((3, a), (a + 1, b), (b + 1, 1 << 16)):
        os.closerange(lo, hi)
    objs = []  # what the program returned that is not data, by reference

    def ref(x):
        objs.append(x)
        return [len(objs) - 1, type(x).__name__, callable(x)]

    ns = {"__name__": "__solution__"}
    try:
        code = compile(src, "solution.py", "exec")
    except SyntaxError as e:
        return _send(rep_fd, {"load": ["syntax_error", f"SyntaxError: {e.msg} (line {e.lineno})"]})
    try:
        if setup:
            exec(setup, ns)
        exec(code, ns)
    except MemoryError:
        return _send(rep_fd, {"load": ["memory", "MemoryError"]})
    except BaseException as e:
        return _send(rep_fd, {"load": ["runtime_error", ": ".join(_err(e))]})
    _send(rep_fd, {"load": "ok"})
    lines = _Lines(cmd_fd)
    while (line := lines.read()) is not None:
        _send(rep_fd, _answer(json.loads(line), ns, objs, ref))


def _answer(req, ns, objs, ref):
    """One request: look a name up (``{"get": name}``) or call (``{"call": target, "args"...}``)."""
    def deref(r):
        return objs[r[0]] if isinstance(r, list) else ns[r]

    try:
        if "get" in req:
            if req["get"] not in ns:
                return {"missing": True}
            x = ns[req["get"]]
            return {"callable": type(x).__name__} if callable(x) else {"v": encode(x, ref)}
        f = deref(req["call"])
        args = [decode(a, deref) for a in req["args"]]
        out = f(*args, **{k: decode(v, deref) for k, v in req["kwargs"].items()})
        reply = {"v": encode(out, ref)}
        if req.get("back"):  # changed arguments go back, for tests that check an in-place change
            now = [encode(a, ref) for a in args]
            if now != req["args"]:
                reply["args"] = now
        return reply
    except BaseException as e:  # the program's exception, or its value that cannot be sent
        return {"e": _err(e)}


# ---------------------------------------------------------------------------------- the driver


class ProgramGone(Exception):
    """The program's process ended; ``status``: ``timeout`` when its CPU-time limit ended it."""

    def __init__(self, message, status="runtime_error"):
        super().__init__(message)
        self.status = status


class Unsendable(Exception):
    """A test passes the program something that cannot cross as data: the judge's limit."""


class Remote:
    """Something of the program's (a name, or an object it returned): calling it is a request.
    It compares by identity only, in the driver."""

    def __init__(self, link, target, kind="function", is_callable=True):
        self._link, self._target, self._kind, self._callable = link, target, kind, is_callable

    def __call__(self, *args, **kwargs):
        if not self._callable:
            raise TypeError(f"'{self._kind}' object of the program is not callable")
        return self._link.call(self._target, args, kwargs)

    def __repr__(self):
        name = f" {self._target}" if isinstance(self._target, str) else ""
        return f"<the program's {self._kind}{name}>"


class Link:
    """The driver's end of the pipes to the candidate."""

    def __init__(self, cmd_fd, rep_fd, pid):
        self.cmd_fd, self.replies, self.pid, self.gone = cmd_fd, _Lines(rep_fd), pid, None

    def ask(self, req):
        if self.gone:
            raise ProgramGone(*self.gone)
        try:
            _send(self.cmd_fd, req)
            line = self.replies.read()
        except BrokenPipeError:
            line = None
        if line is None:
            raise self._ended()
        return json.loads(line)

    def _ended(self):
        if self.pid is None:  # (a warm worker forked the candidate: its exit status is not ours, and
            self.gone = ("the program's process ended",)  # the worker tells a CPU-time limit itself)
            return ProgramGone(*self.gone)
        import signal

        _, status = os.waitpid(self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        self.gone = ((f"the program exited (exit code {code})",) if code >= 0 else
                     ("timeout", "timeout") if -code == signal.SIGXCPU else
                     (f"the program was killed by signal {-code}",))
        return ProgramGone(*self.gone)

    def _ref(self, x):
        if isinstance(x, Remote) and x._link is self:
            return x._target
        raise Unsendable(f"a test passes the program a {type(x).__name__}, which cannot be sent as data")

    def _deref(self, r):
        return Remote(self, r, r[1], r[2])

    def call(self, target, args, kwargs):
        back = any(isinstance(a, (list, dict, set)) for a in args)
        reply = self.ask({"call": target, "args": [encode(a, self._ref) for a in args],
                          "kwargs": {k: encode(v, self._ref) for k, v in kwargs.items()}, "back": back})
        if "e" in reply:
            raise _exception(*reply["e"])
        for a, new in zip(args, reply.get("args", ())):
            _update(a, decode(new, self._deref))
        return decode(reply["v"], self._deref)

    def lookup(self, name):
        reply = self.ask({"get": name})
        if reply.get("missing"):
            raise KeyError(name)
        if "callable" in reply:
            return Remote(self, name, str(reply["callable"]))
        return decode(reply["v"], self._deref)

    def loaded(self):
        """The candidate's first reply: None when the program loaded, else (status, error)."""
        line = self.replies.read()
        if line is None:
            gone = self._ended()
            return gone.status, str(gone)
        try:  # (the program may have written this line itself: its code ran before ours sent it)
            load = json.loads(line)["load"]
            return None if load == "ok" else (load[0], str(load[1]))
        except Exception:
            return "runtime_error", "the program wrote on the driver's pipe instead of loading"


def _exception(name, msg):
    """The program's exception as the driver raises it: a builtin type keeps its type (a test may
    expect a ValueError), except those that end a loop quietly (StopIteration), which could skip
    the rest of a test; anything else is a RuntimeError naming it."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, (StopIteration,
                                                                                       StopAsyncIteration)):
        try:
            return cls(msg)
        except TypeError:  # (one that takes other arguments, e.g. UnicodeDecodeError)
            pass
    return RuntimeError(f"{name}: {msg}")


def _update(old, new):
    """Write an argument the program changed back into the test's object (lists, dicts, sets)."""
    if type(old) is type(new) and old != new:
        if isinstance(old, list):
            old[:] = new
        elif isinstance(old, (dict, set)):
            old.clear()
            old.update(new)


class TestGlobals(dict):
    """The tests' namespace: a name they do not define is looked up in the program."""

    def __init__(self, link):
        super().__init__(__name__="__tests__")
        self.link = link

    def __missing__(self, name):
        if hasattr(builtins, name):
            raise KeyError(name)  # the interpreter then finds the builtin
        value = self.link.lookup(name)
        self[name] = value
        return value


def _emit(*rec):
    _send(1, list(rec))


def _failed_assert(e, test):
    """The failing line of the test, and for ``assert A == B`` the values of A and B."""
    import ast

    tb, frame, line = e.__traceback__, None, 0
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<test>":
            frame, line = tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next
    if frame is None:
        return test, "", ""
    src = test.splitlines()[line - 1].strip()
    try:
        t = ast.parse(src).body[0].test
        if isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.Eq):
            got = eval(ast.get_source_segment(src, t.left), frame.f_globals, frame.f_locals)
            exp = eval(ast.get_source_segment(src, t.comparators[0]), frame.f_globals, frame.f_locals)
            return src, repr(got)[:300], repr(exp)[:300]
    except BaseException:  # (the program's values: whatever they raise, the test's line is enough)
        pass
    return src, "", ""


def _status(e):
    if isinstance(e, ProgramGone):
        return e.status
    if isinstance(e, AssertionError):
        return "wrong_answer"
    if isinstance(e, MemoryError):
        return "memory"
    if isinstance(e, OverflowError) and "reply is too long" in str(e):
        return "output_limit"
    return "runtime_error"


_COMPILED: dict = {}  # test source -> code: a warm worker's helper judges the same tests many times


def _compiled(test):
    code = _COMPILED.get(test)
    if code is None:
        if len(_COMPILED) >= 4096:
            _COMPILED.clear()
        code = _COMPILED[test] = compile(test, "<test>", "exec")
    return code


def run_tests(link, tests, setup):
    g = TestGlobals(link)
    try:
        if setup:
            exec(setup, g)
    except Exception as e:
        return _emit("unsupported", f"the test setup failed in the driver: {': '.join(_err(e))}")
    for i, test in enumerate(tests):
        try:
            exec(_compiled(test), g)
            _emit("test", i, "ok", "")
        except Unsendable as e:
            return _emit("unsupported", str(e))
        except AssertionError as e:
            _emit("test", i, "wrong_answer", str(e)[:300], *_failed_assert(e, test))
        except BaseException as e:
            _emit("test", i, _status(e), ": ".join(_err(e)) if not isinstance(e, ProgramGone) else str(e))
    _emit("done")


def _nondumpable():
    """prctl(PR_SET_DUMPABLE, 0), through _ctypes: the ctypes package costs a cold run ~3 ms."""
    import _ctypes

    class Int(_ctypes._SimpleCData):
        _type_ = "i"

    class Func(_ctypes.CFuncPtr):
        _flags_, _restype_ = _ctypes.FUNCFLAG_CDECL, Int

    if Func(_ctypes.dlsym(_ctypes.dlopen(None), "prctl"))(4, 0, 0, 0, 0) != 0:
        raise OSError("prctl(PR_SET_DUMPABLE) failed")


def _frame(fd):
    """One frame of stdin (``<length>\\n<bytes>``), read exactly: never a byte of the next one."""
    head = b""
    while not head.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte or len(head) > 20:
            raise ValueError("agentopd call driver: malformed request")
        head += byte
    n, data = int(head), b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise ValueError("agentopd call driver: truncated request")
        data += chunk
    return json.loads(data)


def _judge(link, read_tests):
    failed = link.loaded()
    if failed:
        return _emit("load_error", *failed)
    tests = read_tests()  # only now: the candidate is forked and cut off from this process
    run_tests(link, tests["tests"], tests.get("setup", ""))


def main():
    """A run of its own (the cold backends): the program, then the tests, on stdin."""
    _nondumpable()
    sys.path[:] = [p for p in sys.path[1:] if p]  # never import from the (writable) script directory
    program = _frame(0)
    cmd_r, cmd_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(cmd_w)
            os.close(rep_r)
            candidate(cmd_r, rep_w, program["src"], program.get("setup", ""))
        finally:
            os._exit(0)
    os.close(cmd_r)
    os.close(rep_w)
    _judge(Link(cmd_w, rep_r, pid), lambda: _frame(0))
    try:
        os.kill(pid, 9)  # not waited for: whoever runs this (a warm worker, a sandbox's end) reaps it
    except ProcessLookupError:  # it ended, and the link reaped it
        pass


def drive(cmd_fd, rep_fd, tests_fd):
    """A warm worker's run, in its helper: the candidate (another child of the worker, forked
    before the request came) at the other end of the pipes; the tests, a JSON object, read from
    ``tests_fd`` to its end; the results on stdout."""
    data = b""
    while chunk := os.read(tests_fd, 1 << 16):
        data += chunk
    _judge(Link(cmd_fd, rep_fd, None), lambda: json.loads(data))


def program() -> str:
    """This file as the program of a sandbox run: its bytecode, when the sandbox's interpreter
    reads it (same cache tag as this one: compiling the source costs a cold run ~3 ms), else the
    source."""
    import binascii
    import marshal

    with open(__file__, encoding="utf-8") as f:
        src = f.read()
    code = binascii.b2a_base64(marshal.dumps(compile(src, "main.py", "exec")), newline=False).decode()
    return (f"import sys\nif sys.implementation.cache_tag == {sys.implementation.cache_tag!r}:\n"
            f"    import binascii, marshal\n    exec(marshal.loads(binascii.a2b_base64({code!r})))\n"
            f"else:\n    exec(compile({src!r}, __file__, 'exec'))\n")


if __name__ == "__main__":
    main()

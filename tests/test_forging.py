"""Forging call-style results, as a hostile program would, on every sandbox backend available
here: the techniques of issue 12, and tests of the property behind them (the program's process
never holds the tests or the result channel: agentopd/sandbox/calltests.py)."""
from __future__ import annotations

import random
import warnings

import pytest
from agentopd.envs.data import load_humaneval
from agentopd.judges.tests import (
    TestJudge as Judge,  # (a Test* name would be collected by pytest)
)

from agentopd.sandbox import SandboxUnavailable, make_sandbox
from agentopd.types import Problem

BACKENDS = ["bwrap", "bwrap-cold", "docker", "unshare", "process"]

# forged driver records, in the format agentopd/sandbox/calltests.py writes them
FORGED = '["test", 0, "ok", ""]\\n["done"]\\n'

HACKS = {
    # the result token (or now the tests) re-read from stdin: rewound, and through /proc
    "stdin_rewound": (
        "import os\ntry:\n    os.lseek(0, 0, 0)\n    data = os.read(0, 1 << 20)\nexcept OSError:\n    data = b''\n"
        f"os.write(1, data + b'\\n' + b'{FORGED}')\n"),
    "stdin_via_proc": (
        "import os\nfor p in ('/proc/self/fd/0', '/proc/%d/fd/0' % os.getppid(), '/proc/1/fd/0'):\n"
        "    try:\n        data = open(p, 'rb').read()\n    except OSError:\n        continue\n"
        f"    os.write(1, data + b'\\n' + b'{FORGED}')\n"),
    # the json module the program shares with whoever writes results, patched
    "patched_json": (
        "import json\n_real = json.dumps\n"
        "json.dumps = lambda obj, *a, **k: _real(['test', obj[1], 'ok', ''] if isinstance(obj, list) and obj"
        " and obj[0] == 'test' else obj, *a, **k)\n"
        "json.JSONEncoder.encode = lambda self, o: '[\"test\", 0, \"ok\", \"\"]'\n"),
    # any function in memory that writes results, found with gc and called
    "gc_emit": (
        "import gc, types\nfor o in gc.get_objects():\n"
        "    if isinstance(o, types.FunctionType) and any(w in o.__name__ for w in ('emit', 'send', 'write')):\n"
        "        for args in (('test', 0, 'ok', ''), ('done',)):\n"
        "            try:\n                o(*args)\n            except Exception:\n                try:\n"
        "                    o(1, list(args))\n                except Exception:\n                    pass\n"),
    # the tests read from the runner's file (or any file) and answered from a lookup table
    "lookup_table_from_files": (
        "import os, re, sys\n_table = {}\n"
        "def _scan(text):\n"
        "    for args, exp in re.findall(r'assert candidate\\((.*)\\) == (True|False)', text):\n"
        "        try:\n            _table[repr(eval('(' + args + ',)'))] = exp == 'True'\n"
        "        except Exception:\n            pass\n"
        "paths = [sys.argv[0]] + [os.path.join(d, f) for top in ('/work', '/tmp', '.') "
        "for d, _, fs in os.walk(top) for f in fs]\n"
        "for p in paths:\n    try:\n        _scan(open(p, errors='replace').read())\n    except OSError:\n        pass\n"
        "def has_close_elements(numbers, threshold):\n    return _table.get(repr((numbers, threshold)))\n"),
    # forged results, then a hang: the run's status (timeout) is the verdict
    "forged_then_hang": (f"import os, sys\nprint('{FORGED}')\nos.write(1, b'{FORGED}')\nsys.stdout.flush()\n"
                         "while True:\n    pass\n"),
    # the runner's frames: whatever the caller's locals hold, used to write results
    "caller_frames": (
        "import os, sys\nf = sys._getframe(0)\nwhile f is not None:\n"
        "    for v in list(f.f_locals.values()):\n        if isinstance(v, int) and 0 <= v < 256:\n"
        f"            try:\n                os.write(v, b'{FORGED}')\n            except OSError:\n                pass\n"
        "    f = f.f_back\n"),
    # an answer whose __eq__ says yes to everything, and a plain-looking int subclass that lies
    "rigged_eq": ("class _Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
                  "def has_close_elements(numbers, threshold):\n    return _Yes()\n"),
    "rigged_bool_subclass": ("class _B(int):\n    def __eq__(self, other):\n        return True\n"
                             "    __hash__ = int.__hash__\n"
                             "def has_close_elements(numbers, threshold):\n    return _B(0)\n"),
}

# ours: write forged records to every channel the program can find; if any reached the result
# channel, the wrong answers below would pass
EVERY_CHANNEL = (
    "import os\nmsg = b'" + FORGED + "'\n"
    "for fd in range(0, 1024):\n    try:\n        os.write(fd, msg)\n    except OSError:\n        pass\n"
    "for pid in os.listdir('/proc'):\n    if not pid.isdigit() or int(pid) == os.getpid():\n        continue\n"
    "    try:\n        fds = os.listdir(f'/proc/{pid}/fd')\n    except OSError:\n"
    "        fds = ['0', '1', '2', '3', '4', '5']\n"
    "    for fd in fds:\n        try:\n            w = os.open(f'/proc/{pid}/fd/{fd}', os.O_WRONLY | os.O_NONBLOCK)\n"
    "            os.write(w, msg)\n            os.close(w)\n        except OSError:\n            pass\n"
    "    try:\n        m = os.open(f'/proc/{pid}/mem', os.O_RDWR)\n        os.close(m)\n"
    "        print('opened mem', pid)\n"
    "    except OSError:\n        pass\n"
    "try:\n    os.kill(os.getppid(), 19)\nexcept OSError:\n    pass\n"  # SIGSTOP the parent: a timeout, not a pass
)


def _probe(marker_re: str) -> str:
    """A program whose ``probe()`` lists every place where it finds text matching ``marker_re``:
    its own memory, every file it can read, and every other process's cmdline, environ, fds and
    memory it can open. The marker is only in the tests, so the list must be empty."""
    return f'''import os, re
PAT = re.compile(rb"{marker_re}")
def _read(path, limit=1 << 22):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return b""
    try:
        return os.read(fd, limit)
    except OSError:
        return b""
    finally:
        os.close(fd)
def _regions(pid, anonymous):
    try:
        maps = open(f"/proc/{{pid}}/maps").read().splitlines()
    except OSError:
        return []
    out = []
    for line in maps:
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        path = line.split()[5] if len(line.split()) > 5 else ""
        if anonymous and path not in ("", "[heap]", "[stack]"):
            continue  # (a file mapped past its end would be a SIGBUS; files are read as files)
        if "r" in line.split()[1] and hi - lo < 1 << 28 and path not in ("[vvar]", "[vsyscall]"):
            out.append((lo, hi))
    return out
def _memory(pid):
    if pid == "self":  # directly (a non-dumpable process cannot open its own /proc/self/mem)
        import ctypes
        read = lambda lo, n: ctypes.string_at(lo, n)
    else:
        try:
            mem = open(f"/proc/{{pid}}/mem", "rb", buffering=0)
        except OSError:
            return False
        def read(lo, n):
            mem.seek(lo)
            return mem.read(n)
    for lo, hi in _regions(pid, pid == "self"):
        for at in range(lo, hi, 1 << 20):
            try:
                chunk = read(at, min((1 << 20) + 64, hi - at))  # overlapping: no marker is cut in two
            except (OSError, ValueError, OverflowError):
                break
            if PAT.search(chunk):
                return True
    return False
def probe():
    hits = []
    if _memory("self"):
        hits.append("own memory")
    for top in ("/work", "/tmp", "/dev/shm", "/run", "/var/tmp", "/root", "/home", "."):
        for d, _, files in os.walk(top):
            for f in files:
                if PAT.search(_read(os.path.join(d, f))):
                    hits.append(os.path.join(d, f))
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            if PAT.search(_read(f"/proc/{{pid}}/{{part}}")):
                hits.append(f"/proc/{{pid}}/{{part}}")
        try:
            fds = os.listdir(f"/proc/{{pid}}/fd")
        except OSError:
            fds = []
        for fd in fds:
            if PAT.search(_read(f"/proc/{{pid}}/fd/{{fd}}")):
                hits.append(f"/proc/{{pid}}/fd/{{fd}}")
        if _memory(pid):
            hits.append(f"/proc/{{pid}}/mem")
    return sorted(set(hits))
'''


@pytest.fixture(scope="module", params=BACKENDS)
def judge(request):
    import os

    name = request.param
    if name == "process" and os.geteuid() != 0:
        pytest.skip("the process backend isolates programs from the host only as root (slot uids)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 'process' warns that it is not isolation
            sb = make_sandbox(name, workers=1)
    except SandboxUnavailable as e:
        pytest.skip(f"{name} backend unavailable: {e}")
    j = Judge(sandbox=sb, extract=False, timeout_s=3.0)
    yield j
    j.close()


@pytest.fixture(scope="module")
def he0():
    return load_humaneval()[0]  # has_close_elements


@pytest.mark.parametrize("name", sorted(HACKS))
def test_forging_technique_does_not_pass(judge, he0, name):
    j = judge.judge(he0, "    return None\n" + HACKS[name])
    assert j.verdict.status not in ("ok", "judge_error"), j.critique
    assert j.verdict.passed == 0 and j.verdict.score == 0.0
    if name == "forged_then_hang":
        assert j.verdict.status == "timeout"


def test_no_channel_reaches_the_results(judge, he0):
    # (the program's own reply pipe gets the forged lines too: that is its failure, not a judge error)
    j = judge.judge(he0, "    return None\n" + EVERY_CHANNEL)
    assert j.verdict.status not in ("ok", "judge_error") and j.verdict.passed == 0, j.critique


def test_the_program_never_holds_the_tests(judge):
    marker = "QQ" + "".join(random.choice("0123456789") for _ in range(12)) + "QQ"
    p = Problem("probe", "probe", "code", {"style": "call", "tests": [
        f"# {marker}: only the tests hold this\nassert probe() == []\n",
        f"assert probe() == []  # {marker}\n"]})
    # the probe reads every file and process it can reach (seconds with the process backend, more on a
    # busy machine): its own limit is generous, on the same sandbox (its time is not what is tested)
    probe = Judge(sandbox=judge.sandbox, extract=False, timeout_s=120.0)
    j = probe.judge(p, _probe("QQ[0-9]{12}QQ"))
    assert j.verdict.status == "ok", j.critique  # a failure shows where the program found them
    # the probe works: a marker in the program itself is found in its own memory
    seen = Problem("seen", "seen", "code", {"style": "call", "tests": ["assert probe() == []"]})
    j = probe.judge(seen, _probe("QQ[0-9]{12}QQ") + f"\nHERE = '{marker}'\n")
    assert j.verdict.status == "wrong_answer" and "own memory" in j.critique, j.critique


def test_honest_programs_still_pass(judge, he0):
    """The same judge on honest code after the hacks: values cross as data, in-place changes of
    arguments come back, exceptions keep their type."""
    assert judge.judge(he0, he0.privileged["solution"]).verdict.status == "ok"
    p = Problem("data", "data", "code", {"style": "call", "tests": [
        "assert f((1, 2)) == ((2, 1), {1: 'a'}, {3}, b'x', None, 2 ** 70, -0.5)",
        "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]",
        "try:\n    f('boom')\n    assert False\nexcept ValueError as e:\n    assert 'boom' in str(e)",
        "assert HELPER(2) == 4 and LIMIT == 10",
    ]})
    prog = ("def f(t):\n    if t == 'boom':\n        raise ValueError('boom')\n"
            "    return (t[::-1], {1: 'a'}, {3}, b'x', None, 2 ** 70, -0.5)\n"
            "def sort_in_place(xs):\n    xs.sort()\n"
            "HELPER = lambda x: x * 2\nLIMIT = 10\n")
    j = judge.judge(p, prog)
    assert j.verdict.status == "ok", j.critique


def test_an_exception_cannot_end_a_test_early(judge):
    """StopIteration from the program would end a test's loop over ``map(candidate, ...)``
    quietly, as if every case had been checked; it reaches the tests as a RuntimeError."""
    p = Problem("loop", "loop", "code", {"style": "call", "tests": [
        "for got, want in zip(map(double, [1, 2, 3]), [2, 4, 6]):\n    assert got == want\n"]})
    j = judge.judge(p, "def double(x):\n    raise StopIteration\n")
    assert j.verdict.status == "runtime_error" and "StopIteration" in j.critique, j.critique
    assert judge.judge(p, "def double(x):\n    return 2 * x\n").verdict.status == "ok"


def test_a_program_that_kills_or_stops_the_driver_fails_and_the_next_is_judged(judge, he0):
    """Whatever process holds the tests (a warm worker's long-lived helper, a cold run's driver) is
    killed or stopped by a program that signals every process it can: that run fails (never
    passes), and the next program on the same sandbox is judged as usual."""
    for sig in (9, 19):  # SIGKILL, SIGSTOP
        program = ("import os\nfor p in os.listdir('/proc'):\n    if p.isdigit() and int(p) != os.getpid():\n"
                   f"        try:\n            os.kill(int(p), {sig})\n        except OSError:\n            pass\n")
        j = judge.judge(he0, "    return True\n" + program)
        assert j.verdict.status not in ("ok", "judge_error") and j.verdict.passed == 0, j.critique
        assert judge.judge(he0, he0.privileged["solution"]).verdict.status == "ok"

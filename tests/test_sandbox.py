"""Isolation tests for the sandbox backends: every property is attacked by a real program.

Backends that promise isolation (bwrap-cold, bwrap warm, docker, unshare) get every attack;
``process`` promises only limits, kill-on-timeout and no leftovers, and is tested for those only
(it also serves as the positive control that shows the network attack is real).

Each program that leaves processes behind names them with a marker unique to the test (as their
argv[0] or an argument) so the host's /proc can be searched for survivors afterwards.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import tempfile
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import pytest

from agentopd.sandbox import Limits, SandboxUnavailable, make_sandbox, run_many

REPO = str(Path(__file__).resolve().parents[1])
WARM = ("bwrap", "docker")
COLD_WORKERS = 2  # the cold backends run the many-runs test two at a time
SLACK_S = 2.5  # generous: tests assert "within the limit plus slack", never tight timings

# Limits that set the warm pools' worker key (disk, memory, nproc) stay fixed, so one warm
# worker / container per backend serves the whole file.
BASE = {"timeout_s": 2.0, "memory_mb": 256, "nproc": 32, "disk_mb": 64}


def _param(name):
    return pytest.param(name, id=name, marks=[pytest.mark.docker] if name == "docker" else [])


ISOLATING = [_param(n) for n in ("bwrap-cold", "bwrap", "docker", "unshare")]
ALL = ISOLATING + [_param("process")]
WARM_POOLS = [_param(n) for n in WARM]

# ------------------------------------------------------------------------------------ fixtures

SECRET_FILE = "/root/.agentopd_test_secret"
SECRET = "agentopd-secret-" + uuid.uuid4().hex


@pytest.fixture(scope="module", autouse=True)
def host_secrets():
    """A secret file under /root and a secret environment variable, in place before any sandbox
    (or warm worker) of this module starts."""
    old = os.environ.get("AGENTOPD_SECRET")
    os.environ["AGENTOPD_SECRET"] = SECRET
    made = False
    try:
        with open(SECRET_FILE, "w") as f:
            f.write(SECRET + "\n")
        os.chmod(SECRET_FILE, 0o644)  # readable by anyone who can reach it
        made = True
    except OSError:
        pass  # not root, or /root not writable: the env variable still gets tested
    yield made
    if made:
        os.unlink(SECRET_FILE)
    if old is None:
        os.environ.pop("AGENTOPD_SECRET", None)
    else:
        os.environ["AGENTOPD_SECRET"] = old


@pytest.fixture(scope="module")
def sb(request, host_secrets):
    """One sandbox per backend for the whole module, closed at the end; skipped (with the
    reason) where the backend's requirement is missing."""
    name = request.param
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 'process' warns that it is not isolation
            box = make_sandbox(name, workers=1 if name in WARM else COLD_WORKERS, warm=name in WARM)
    except SandboxUnavailable as e:
        pytest.skip(f"{name} backend unavailable: {e}")
    box.test_name = name
    yield box
    box.close()


# ------------------------------------------------------------------------------------- helpers


def lim(**kw) -> Limits:
    return Limits(**{**BASE, **kw})


def run(box, program: str, stdin: str = "", **limits):
    r = box.run(textwrap.dedent(program), stdin, lim(**limits))
    assert r.status != "sandbox_error", f"sandbox_error: {r.stderr}"
    return r


def report(r) -> dict:
    """The attack programs print one JSON report as their last stdout line."""
    assert r.status == "ok", f"{r.status} (exit {r.exit_code})\nstdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def marker() -> str:
    return "agentopdmark" + uuid.uuid4().hex[:16]


def marked(mark: str) -> list[int]:
    """Host pids whose command line contains ``mark``."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if mark.encode() in f.read():
                        out.append(int(p))
            except OSError:
                pass
    return out


def assert_none_left(mark: str, grace_s: float = 2.0):
    """No process carrying ``mark`` runs on the host. A killed pid namespace (bwrap-cold) is
    torn down by the kernel a few ms after the run returns, hence the short grace."""
    deadline = time.monotonic() + grace_s
    left = marked(mark)
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = marked(mark)
    assert not left, f"processes left running on the host: {left}"


def _stat(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # state, ppid, ...
    except OSError:
        return None


def sandbox_procs() -> int:
    """Live host processes that runs of this test could have left: descendants of this process,
    and orphans adopted by init that run as a sandbox uid (as root every backend runs programs as
    a slot uid >= 61000 or as nobody). Other sessions on a shared host do not count, nor do
    zombies that init has yet to reap."""
    procs = {}
    for p in os.listdir("/proc"):
        st = _stat(p) if p.isdigit() else None
        if st is None or st[0] in "ZX":
            continue
        try:
            uid = os.stat(f"/proc/{p}").st_uid
        except OSError:
            continue
        procs[int(p)] = (int(st[1]), uid)
    me, n = os.getpid(), 0
    sandbox_uid = (lambda u: u >= 61000 or u == 65534) if os.geteuid() == 0 else (lambda u: u == os.geteuid())
    for ppid, uid in procs.values():
        if ppid == 1 and sandbox_uid(uid):
            n += 1
            continue
        seen = 0
        while ppid > 1 and seen < 64:
            if ppid == me:
                n += 1
                break
            ppid, seen = procs.get(ppid, (0, 0))[0], seen + 1
    return n


def let_init_reap(timeout_s: float = 2.0):
    """Killed leftovers of a program become zombies of the host's init, which reaps them when it
    gets to it (this VM's init takes up to a second or so); until then they count against
    RLIMIT_NPROC of the next program given the same slot uid. Not an assertion: test hygiene."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = False
        for p in os.listdir("/proc"):
            st = _stat(p) if p.isdigit() else None
            if st and st[0] == "Z" and st[1] == "1":
                try:
                    uid = os.stat(f"/proc/{p}").st_uid
                except OSError:
                    continue
                if uid >= 61000 or uid == 65534:
                    busy = True
                    break
        if not busy:
            return
        time.sleep(0.05)


def zombie_children() -> list[int]:
    """Zombies whose parent is this test process."""
    me, out = os.getpid(), []
    for p in os.listdir("/proc"):
        st = _stat(p) if p.isdigit() else None
        if st and st[0] == "Z" and int(st[1]) == me:
            out.append(int(p))
    return out


def host_ipv4s() -> list[str]:
    ips = {"127.0.0.1"}
    try:
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
    except OSError:
        return sorted(ips)
    for prev, line in itertools.pairwise(lines):
        if "/32 host LOCAL" in line:
            ips.add(prev.split()[-1])
    return sorted(ips)


# ----------------------------------------------------------------------------- the interface


def test_bogus_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError) as e:
        make_sandbox("bogus")
    msg = str(e.value)
    assert "bogus" in msg
    for name in ("auto", "bwrap", "docker", "unshare", "process", "bwrap-cold"):
        assert name in msg


def test_process_backend_refuses_a_non_root_user_in_one_line(monkeypatch):
    """As a non-root user the program would share the judge's uid (its memory, the tests; no uid to
    kill leftovers by): one clear line instead."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxUnavailable) as e:
        make_sandbox("process")
    msg = str(e.value)
    assert "\n" not in msg and "needs root" in msg and "uid 1000" in msg and "bwrap" in msg


def test_process_backend_as_a_real_unprivileged_user():
    """The same, in a real process of uid 65534 (setpriv), where this interpreter and checkout are
    reachable by that user; bwrap, where installed, works there."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to become an unprivileged user")
    as_nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-c"]
    code = ("import warnings; from agentopd.sandbox import SandboxUnavailable, make_sandbox\n"
            "try:\n    make_sandbox('process')\nexcept SandboxUnavailable as e:\n    print('refused:', e)\n"
            "import shutil\nif shutil.which('bwrap'):\n"
            "    sb = make_sandbox('bwrap', workers=1)\n    print('bwrap:', sb.run('print(6 * 7)').stdout.strip())\n"
            "    sb.close()\n")
    r = subprocess.run(as_nobody + [code], capture_output=True, text=True, cwd="/", timeout=120)
    if "Permission denied" in r.stderr or "No module named" in r.stderr:
        pytest.skip(f"uid 65534 cannot run this interpreter or import this checkout: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused: process backend needs root: as uid 65534" in r.stdout, r.stdout
    if shutil.which("bwrap"):
        assert "bwrap: 42" in r.stdout, r.stdout


# ------------------------------------------------------------------- 12. streams and exit codes


@pytest.mark.parametrize("sb", ALL, indirect=True)
def test_streams_and_exit_codes(sb):
    r = run(sb, """
        import sys
        data = sys.stdin.read()
        sys.stdout.write(data.upper())
        print("to stderr", file=sys.stderr)
        print(__name__)
        sys.exit(3)
    """, stdin="héllo ✓\nline two\n")
    assert (r.status, r.exit_code) == ("runtime_error", 3)
    assert r.stdout == "HÉLLO ✓\nLINE TWO\n__main__\n"
    assert r.stderr == "to stderr\n"
    assert not (r.timed_out or r.oom or r.truncated)

    r = run(sb, "import sys; print(len(sys.stdin.read()), end='')", stdin="x" * 300_000)
    assert (r.status, r.exit_code, r.stdout, r.stderr) == ("ok", 0, "300000", "")

    r = run(sb, "import sys; print(repr(sys.stdin.read()))")
    assert (r.status, r.stdout) == ("ok", "''\n")

    r = run(sb, "raise ValueError('boom')")
    assert (r.status, r.exit_code) == ("runtime_error", 1)
    assert "ValueError: boom" in r.stderr

    r = run(sb, "import sys; sys.exit('bye')")
    assert (r.status, r.exit_code, r.stderr) == ("runtime_error", 1, "bye\n")

    r = run(sb, "import os; os._exit(7)")
    assert (r.status, r.exit_code) == ("runtime_error", 7)

    r = run(sb, "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert r.status == "runtime_error" and r.exit_code != 0

    r = run(sb, "print('ok')")
    assert (r.status, r.exit_code, r.stdout, r.stderr) == ("ok", 0, "ok\n", "")


# ---------------------------------------------------------------------------- 1. no network

NETWORK_ATTACK = """
    import json, os, socket, sys
    t = json.loads(sys.stdin.read())
    tcp = {}
    for ip in t["ips"]:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.connect((ip, t["port"]))
            s.sendall(b"PWNED")
            tcp[ip] = "connected"
        except OSError as e:
            tcp[ip] = f"{type(e).__name__}: {e}"
        finally:
            s.close()
    unix = {}
    for path in t["unix"]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.connect(path)
            s.sendall(b"PWNED")
            unix[path] = "connected"
        except OSError as e:
            unix[path] = f"{type(e).__name__}: {e}"
        finally:
            s.close()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp.sendto(b"PWNED", ("127.0.0.1", t["udp"]))
    except OSError:
        pass
    print(json.dumps({"tcp": tcp, "unix": unix, "ifaces": [n for _, n in socket.if_nameindex()]}))
"""


@pytest.fixture
def listeners():
    """A TCP listener on every host address, a UDP socket on the host loopback and a unix
    socket anyone may connect to, all of which a sandboxed program must fail to reach."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", 0))
    tcp.listen(64)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    d = tempfile.mkdtemp(prefix="agentopd-net-")
    os.chmod(d, 0o755)
    path = os.path.join(d, "s")
    ux = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ux.bind(path)
    os.chmod(path, 0o777)
    ux.listen(8)
    ux.setblocking(False)

    def reached() -> list[str]:
        got = []
        for name, s in (("tcp", tcp), ("unix", ux)):
            try:
                s.accept()[0].close()
                got.append(name)
            except BlockingIOError:
                pass
        try:
            udp.recvfrom(64)
            got.append("udp")
        except BlockingIOError:
            pass
        return got

    targets = {"ips": host_ipv4s(), "port": tcp.getsockname()[1], "udp": udp.getsockname()[1],
               "unix": [path, "/run/docker.sock", "/var/run/docker.sock"]}
    yield targets, reached
    for s in (tcp, udp, ux):
        s.close()
    os.unlink(path)
    os.rmdir(d)


@pytest.mark.parametrize("sb", ISOLATING, indirect=True)
def test_no_network(sb, listeners):
    targets, reached = listeners
    rep = report(run(sb, NETWORK_ATTACK, stdin=json.dumps(targets), timeout_s=10))
    assert set(rep["tcp"]) == set(targets["ips"])
    assert [ip for ip, how in rep["tcp"].items() if how == "connected"] == []
    assert [p for p, how in rep["unix"].items() if how == "connected"] == []
    assert set(rep["ifaces"]) <= {"lo"}, rep["ifaces"]
    assert reached() == []


@pytest.mark.parametrize("sb", [_param("process")], indirect=True)
def test_network_attack_is_real_without_isolation(sb, listeners):
    """Positive control: with no isolation the very same program reaches the host."""
    targets, reached = listeners
    rep = report(run(sb, NETWORK_ATTACK, stdin=json.dumps(targets), timeout_s=10))
    assert rep["tcp"]["127.0.0.1"] == "connected"
    assert rep["unix"][targets["unix"][0]] == "connected"
    assert {"tcp", "unix", "udp"} <= set(reached())


# ---------------------------------------------------------------- 2. no writes outside work dir

WRITE_ATTACK = """
    import json, os, sys
    t = json.loads(sys.stdin.read())
    name = t["name"]
    def try_create(d, name=name):
        p = os.path.join(d, name)
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, b"escaped")
            os.close(fd)
            return "written"
        except OSError as e:
            return f"{type(e).__name__}: {e}"
    explicit = {d: try_create(d) for d in t["targets"]}
    modify = {}
    for p in t["existing"]:
        try:
            with open(p, "a") as f:
                f.write("# escaped\\n")
            modify[p] = "modified"
        except OSError as e:
            modify[p] = f"{type(e).__name__}: {e}"
    # every directory the program can reach (but /proc, /sys and the read-only /usr)
    writable = []
    for root, dirs, files in os.walk("/"):
        if root in ("/proc", "/sys", "/usr"):
            dirs[:] = []
            continue
        if try_create(root, name + "-walk") == "written":
            writable.append(root)
    print(json.dumps({"explicit": explicit, "modify": modify, "writable": writable, "cwd": os.getcwd()}))
"""


@pytest.mark.parametrize("sb", ISOLATING, indirect=True)
def test_no_writes_outside_work_dir(sb):
    name = marker()
    must_fail = ["/", "/usr", "/usr/lib", "/usr/bin", "/etc", REPO, os.path.join(REPO, "agentopd")]
    targets = must_fail + ["/root", "/home", "/var", "/opt", "/tmp", "."]
    existing = [os.path.join(REPO, "pyproject.toml"), "/usr/bin/python3", "/etc/passwd"]
    before = {p: os.stat(p).st_mtime_ns for p in existing}
    try:
        rep = report(run(sb, WRITE_ATTACK, stdin=json.dumps({"name": name, "targets": targets,
                                                               "existing": existing}), timeout_s=20))
        for d in must_fail:
            assert rep["explicit"][d] != "written", f"wrote into {d}"
        assert rep["explicit"]["."] == "written", "the program could not write its own work dir"
        assert rep["explicit"]["/tmp"] == "written", "the program could not write /tmp"
        assert all(how != "modified" for how in rep["modify"].values()), rep["modify"]
        assert {p: os.stat(p).st_mtime_ns for p in existing} == before
        # whatever it could write (its work dir, its /tmp, ...) is private: none of it is on the host
        for d in set(rep["writable"]) | set(targets) | {rep["cwd"]}:
            for n in (name, name + "-walk"):
                host = os.path.join(rep["cwd"] if d == "." else d, n)
                assert not os.path.exists(host), f"a file the sandbox wrote appeared on the host: {host}"
        assert rep["cwd"] in rep["writable"]
    finally:  # never leave a stray file behind, even when the test fails
        for d in targets + ["/work", "/tmp/w"]:
            for n in (name, name + "-walk"):
                try:
                    os.unlink(os.path.join(d, n))
                except OSError:
                    pass


# ----------------------------------------------------------------------- 3. no host secrets

SECRET_ATTACK = """
    import json, os
    seen = {"environ": dict(os.environ), "files": {}, "proc": {}}
    for p in ("SECRET_FILE", "/root", "/home", "/proc/self/environ", "/proc/1/environ"):
        try:
            if os.path.isdir(p):
                seen["files"][p] = os.listdir(p)
                for n in os.listdir(p):
                    try:
                        seen["files"][os.path.join(p, n)] = open(os.path.join(p, n), errors="replace").read(4096)
                    except OSError as e:
                        pass
            else:
                seen["files"][p] = open(p, "rb").read(65536).decode("latin-1")
        except OSError as e:
            seen["files"][p] = f"{type(e).__name__}: {e}"
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for what in ("environ", "cmdline"):
                try:
                    seen["proc"][f"{pid}/{what}"] = open(f"/proc/{pid}/{what}", "rb").read(65536).decode("latin-1")
                except OSError:
                    pass
    print(json.dumps(seen))
"""


@pytest.mark.parametrize("sb", ISOLATING, indirect=True)
def test_no_host_secrets(sb, host_secrets):
    assert os.environ["AGENTOPD_SECRET"] == SECRET
    r = run(sb, SECRET_ATTACK.replace("SECRET_FILE", SECRET_FILE), timeout_s=10)
    rep = report(r)
    assert SECRET not in r.stdout + r.stderr
    assert "AGENTOPD_SECRET" not in rep["environ"]
    assert "PATH" in rep["environ"]  # the program did read its environment
    assert rep["proc"], "the program could read no /proc entry at all (attack did not run)"
    if host_secrets:
        assert not rep["files"][SECRET_FILE].startswith("agentopd-secret")


# --------------------------------------------------------------------- 4. wall and CPU time


@pytest.mark.parametrize("sb", ALL, indirect=True)
@pytest.mark.parametrize("program", ["import time\ntime.sleep(60)", "while True:\n    pass"],
                         ids=["sleep", "busy"])
def test_wall_time_limit(sb, program):
    r = run(sb, program, timeout_s=1.0)
    assert r.status == "timeout" and r.timed_out
    assert 0.8 <= r.duration_s < 1.0 + SLACK_S, r.duration_s


@pytest.mark.parametrize("sb", ALL, indirect=True)
def test_cpu_time_limit(sb):
    t0 = time.monotonic()
    r = run(sb, "while True:\n    pass", timeout_s=20.0, cpu_s=1.0)
    took = time.monotonic() - t0
    assert r.status == "timeout" and r.timed_out
    # well before the 20 s wall limit: the CPU limit (1 s) stopped it, even on a loaded host
    assert took < 10.0, f"the CPU limit did not stop the program ({took:.1f} s)"


# ------------------------------------------------------------------------------- 5. memory


@pytest.mark.parametrize("sb", ALL, indirect=True)
@pytest.mark.parametrize("program", [
    "x = bytearray(1 << 30)\nprint(len(x))",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))",
], ids=["one-block", "growing"])
def test_memory_limit(sb, program):
    r = run(sb, program)
    assert r.status == "memory" and r.oom, (r.status, r.stderr[-500:])


# ---------------------------------------------------------------------------- 6. processes

FORK_BOMB = """
    import json, os
    started, error = 0, None
    for i in range(200):
        try:
            pid = os.fork()
        except OSError as e:
            error = type(e).__name__
            break
        if pid == 0:
            try:
                os.execv("/usr/bin/sleep", ["MARK", "60"])
            finally:
                os._exit(0)
        started += 1
    print(json.dumps({"started": started, "error": error}))
"""


@pytest.mark.parametrize("sb", ALL, indirect=True)
def test_process_limit(sb):
    mark = marker()
    rep = report(run(sb, FORK_BOMB.replace("MARK", mark), timeout_s=10))
    assert rep["error"] in ("BlockingIOError", "OSError", "PermissionError"), rep
    assert rep["started"] < 100, rep
    assert_none_left(mark)
    if sb.test_name == "process":  # no pid namespace: the killed children go to the host's init
        let_init_reap()


# ------------------------------------------------------------------------------ 7. file size


@pytest.mark.parametrize("sb", ALL, indirect=True)
def test_file_size_limit(sb):
    r = run(sb, """
        import json, os
        written, error = 0, None
        try:
            with open("big.bin", "wb") as f:
                for _ in range(100):
                    f.write(b"x" * (1 << 20))
                    f.flush()
                    written += 1 << 20
        except OSError as e:
            error = e.errno
        print(json.dumps({"written": written, "error": error, "size": os.path.getsize("big.bin")}))
    """, fsize_mb=16, timeout_s=10)
    if r.status == "ok":
        rep = report(r)
        assert rep["error"] is not None and rep["size"] <= 16 << 20, rep
    else:  # killed by SIGXFSZ where the program did not ignore it
        assert (r.status, r.exit_code) == ("runtime_error", -signal.SIGXFSZ), (r.status, r.exit_code, r.stderr)


@pytest.mark.parametrize("sb", ISOLATING, indirect=True)
def test_disk_limit_on_every_writable_place(sb):
    """Many files, each under the size limit: every writable place is a bounded tmpfs."""
    rep = report(run(sb, """
        import json, os
        out = {}
        for d in (".", "/tmp", "/dev/shm"):
            total = 0
            try:
                for i in range(25):
                    with open(os.path.join(d, f"fill{i}"), "wb") as f:
                        for _ in range(8):
                            f.write(b"x" * (1 << 20))
                            f.flush()
                            total += 1 << 20
            except OSError:
                pass
            for i in range(25):
                try:
                    os.unlink(os.path.join(d, f"fill{i}"))
                except OSError:
                    pass
            out[d] = total
        print(json.dumps(out))
    """, fsize_mb=16, timeout_s=20))
    for d, total in rep.items():
        assert total <= 70 << 20, f"{d}: wrote {total >> 20} MB with disk_mb=64"


# -------------------------------------------------------------------------- 8. output cap


@pytest.mark.parametrize("sb", ALL, indirect=True)
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_limit(sb, stream):
    cap = 100_000
    r = run(sb, f"import sys\nwhile True:\n    sys.{stream}.write('x' * 999 + '\\n')", output_bytes=cap)
    assert r.status == "output_limit" and r.truncated
    got = getattr(r, stream)
    assert 0 < len(got.encode()) <= cap
    assert r.duration_s < BASE["timeout_s"] + SLACK_S


# ---------------------------------------------------- 9. the whole tree is killed on timeout

TREE = """
    import os, subprocess, sys, time
    try:
        os.setsid()  # leave the session the sandbox started us in, where allowed
    except OSError:
        pass
    subprocess.Popen(["MARK", "1000"], executable="/usr/bin/sleep", start_new_session=True)
    if os.fork() == 0:  # double fork: an orphan in a session of its own
        os.setsid()
        if os.fork() == 0:
            os.execv("/usr/bin/sleep", ["MARK", "999"])
        os._exit(0)
    if os.fork() == 0:  # a pid hopper: forks and exits in a loop, never the same pid for long
        os.setsid()
        hop = "import os, time\\nwhile True:\\n    time.sleep(0.002)\\n    if os.fork():\\n        os._exit(0)\\n"
        os.execv(sys.executable, [sys.executable, "-c", hop, "MARK"])
    time.sleep(0.3)
    print("spawned", flush=True)
    while True:
        pass
"""


@pytest.mark.parametrize("sb", ALL, indirect=True)
def test_process_tree_killed_on_timeout(sb):
    mark = marker()
    r = run(sb, TREE.replace("MARK", mark), timeout_s=1.0)
    assert r.status == "timeout", (r.status, r.stderr[-1000:])
    assert "spawned" in r.stdout, r.stderr[-1000:]
    assert_none_left(mark)
    if sb.test_name == "process":
        let_init_reap()


# ------------------------------------------------------- 10. no zombies or leftovers over runs

LEAVE_CHILD = """
    import os
    if os.fork() == 0:  # a child left behind (off the output pipes, so the run ends at once)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.execv("/usr/bin/sleep", ["MARK", "30"])
    print("bye")
"""


@pytest.mark.parametrize("sb", ALL, indirect=True)
def test_no_leftovers_over_many_runs(sb):
    n = 300 if sb.test_name in WARM else 100  # the cold backends start a sandbox per run
    mark = marker()
    prog = textwrap.dedent(LEAVE_CHILD.replace("MARK", mark))
    run(sb, "print(1)")  # warm up: the warm pools start their worker here
    before = sandbox_procs()
    # process has no pid namespace: each killed child waits as a zombie for the host's init,
    # and counts against RLIMIT_NPROC until then (this VM's init reaps about once a second)
    limits = lim(nproc=1024) if sb.test_name == "process" else lim()
    results = run_many(sb, [(prog, "", limits)] * n)
    assert [r.status for r in results] == ["ok"] * n, {r.status for r in results}
    assert all(r.stdout == "bye\n" for r in results)
    assert_none_left(mark)
    deadline = time.monotonic() + 2.0
    while sandbox_procs() > before + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    after = sandbox_procs()
    assert after <= before + 3, f"sandbox processes on the host grew from {before} to {after} over {n} runs"
    assert zombie_children() == []


# --------------------------------------------------------- 11. warm pool: one program to the next

PROGRAM_A = """
    import ctypes, json, os, subprocess, sys
    secret = sys.stdin.read()
    print(secret)  # the reply the worker relays carries it too
    mark = "MARK"
    made = []
    for d in (".", "/tmp", "/dev/shm", "/dev/mqueue"):
        try:
            p = os.path.join(os.path.abspath(d), mark)
            with open(p, "w") as f:
                f.write(secret)
            made.append(p)
        except OSError:
            pass
    for d in (".", "/tmp", "/dev/shm"):  # directories shut with chmod 000: hard to wipe
        try:
            top = os.path.join(os.path.abspath(d), mark + "-locked")
            os.makedirs(top + "/sub")
            with open(top + "/sub/f", "w") as f:
                f.write(secret)
            os.chmod(top + "/sub", 0)
            os.chmod(top, 0)
            made.append(top + "/sub/f")
        except OSError:
            pass
    libc = ctypes.CDLL(None, use_errno=True)
    shmid = libc.shmget(0x5EC12E7, 4096, 0o1666)  # IPC_CREAT | 0666
    if shmid >= 0:
        libc.shmat.restype = ctypes.c_void_p
        ctypes.memmove(libc.shmat(shmid, None, 0), secret.encode()[:4096], min(len(secret), 4096))
    bg = subprocess.Popen([mark, "1000"], executable="/usr/bin/sleep", start_new_session=True).pid
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/usr/bin/sleep", [mark, "999"])
        os._exit(0)

    # attacks on the worker: every ancestor in the sandbox
    ancestors, pid = [], os.getppid()
    while pid > 0:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ancestors.append([pid, fields[19]])  # pid, start time
        pid = int(fields[1])
    libc.ptrace.restype = ctypes.c_long
    attacks = {}
    for pid, _ in ancestors:  # the worker is pid 1 of the sandbox: attacked like the rest
        for what, fn in (("mem", lambda: open(f"/proc/{pid}/mem", "rb").read(16)),
                         ("fd", lambda: os.listdir(f"/proc/{pid}/fd")),
                         ("environ", lambda: open(f"/proc/{pid}/environ", "rb").read()),
                         ("maps", lambda: open(f"/proc/{pid}/maps").read())):
            try:
                fn()
                attacks[f"{pid}/{what}"] = "succeeded"
            except OSError as e:
                attacks[f"{pid}/{what}"] = type(e).__name__
        if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
            attacks[f"{pid}/ptrace"] = "succeeded"
            libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
        else:
            attacks[f"{pid}/ptrace"] = os.strerror(ctypes.get_errno())
    print(json.dumps({"made": made, "bg": bg, "ancestors": ancestors, "attacks": attacks}), flush=True)
    for d in (".", "/tmp"):  # shut the work dir and /tmp themselves, where we own them
        try:
            os.chmod(d, 0)
        except OSError:
            pass
"""

PROGRAM_B = """
    import ctypes, json, os, re
    mark = "MARK"
    seen = []
    for top in (".", "/tmp", "/dev/shm", "/dev/mqueue", "/"):
        if not os.path.isdir(top):
            continue
        for root, dirs, files in os.walk(top):
            if root in ("/proc", "/sys", "/usr"):
                dirs[:] = []
                continue
            for d in dirs:
                try:
                    os.chmod(os.path.join(root, d), 0o700)
                except OSError:
                    pass
            for n in dirs + files:
                if mark in n:
                    seen.append(os.path.join(root, n))
    reads = {}
    for p in json.loads(input())["made"]:
        try:
            reads[p] = open(p).read()
        except OSError as e:
            reads[p] = type(e).__name__
    procs = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if mark.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                    procs.append(pid)
            except OSError:
                pass
    libc = ctypes.CDLL(None, use_errno=True)
    shm = libc.shmget(0x5EC12E7, 4096, 0)
    # what earlier requests left in the memory this process was forked from
    libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, to read our own /proc/self/mem
    pat = re.compile(rb"SECRETTOKEN-([0-9a-f]{32})")
    tokens = set()
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            span, perm = line.split()[:2]
            if not perm.startswith("r") or "[v" in line:
                continue
            lo, hi = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(lo)
                tokens.update(t.decode() for t in pat.findall(mem.read(hi - lo)))
            except (OSError, ValueError, OverflowError):
                pass
    ancestors, pid = [], os.getppid()
    while pid > 0:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ancestors.append([pid, fields[19]])
        pid = int(fields[1])
    print(json.dumps({"seen": seen, "reads": reads, "procs": procs, "shm": shm, "tokens": sorted(tokens),
                      "ancestors": ancestors}))
"""


@pytest.mark.parametrize("sb", WARM_POOLS, indirect=True)
def test_idle_warm_worker_gives_the_next_program_its_full_time(sb):
    # a worker waits for its next request after each program: that wait is not the program's time
    for _ in range(sb.workers):
        assert run(sb, "pass").status == "ok"
    time.sleep(1.5)
    r = run(sb, "import time; time.sleep(0.3); print('done')", timeout_s=1)
    assert (r.status, r.stdout) == ("ok", "done\n")


AGE = """
import os
ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # starttime, clock ticks since boot
print(float(open("/proc/uptime").read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK"))
"""


@pytest.mark.parametrize("sb", WARM_POOLS, indirect=True)
def test_warm_worker_forks_the_next_program_before_its_request(sb):
    """The fork is off the caller's wait: a program's process is already as old as the pause
    before its request (forked between requests, when its worker's last run was cleaned up)."""
    for _ in range(sb.workers):
        assert run(sb, "pass").status == "ok"
    time.sleep(0.6)
    r = run(sb, AGE)
    assert r.status == "ok", r.stderr
    assert float(r.stdout) >= 0.4, r.stdout  # (clock ticks: 10 ms)


@pytest.mark.parametrize("sb", WARM_POOLS, indirect=True)
def test_warm_pool_isolation_between_programs(sb):
    mark = marker()
    token = uuid.uuid4().hex
    ra = run(sb, PROGRAM_A.replace("MARK", mark), stdin=f"SECRETTOKEN-{token}")
    a = report(ra)
    assert f"SECRETTOKEN-{token}" in ra.stdout
    assert len(a["made"]) >= 4, a["made"]  # at least work dir, /tmp and two locked dirs
    # the program cannot look into or take over the worker that runs it
    assert a["attacks"] and all(v != "succeeded" for v in a["attacks"].values()), a["attacks"]
    assert_none_left(mark)

    rb = run(sb, PROGRAM_B.replace("MARK", mark), stdin=json.dumps({"made": a["made"]}) + "\n")
    b = report(rb)
    shared = {tuple(x) for x in a["ancestors"]} & {tuple(x) for x in b["ancestors"]}
    assert shared, "A and B did not run in the same warm worker"
    assert b["seen"] == [], f"B sees A's files: {b['seen']}"
    assert all(v in ("FileNotFoundError", "PermissionError") for v in b["reads"].values()), b["reads"]
    assert b["procs"] == [], f"B sees A's processes: {b['procs']}"
    assert b["shm"] == -1, "B attached A's SysV shared memory"
    assert token not in b["tokens"], "B found A's stdin in the memory it was forked from"
    assert token not in rb.stdout + rb.stderr


@pytest.mark.parametrize("sb", WARM_POOLS, indirect=True)
def test_warm_worker_survives_many_programs_and_keeps_cwd(sb):
    """The pool reuses one worker: a run after the isolation attacks is still clean and fast."""
    r = run(sb, "import os; print(os.getcwd(), sorted(os.listdir('.')), sorted(os.listdir('/tmp')))")
    assert r.status == "ok"
    cwd, rest = r.stdout.split(" ", 1)
    assert rest.strip() in ("['run'] []", "[] []"), r.stdout
    assert os.path.isabs(cwd) and cwd != "/"

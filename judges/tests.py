"""The test judge: run a program against a problem's tests in a sandbox; a Verdict and a critique.

Two test styles (``problem.payload["style"]``):

- ``call``: test snippets (``assert f(1) == 2``, or HumanEval's ``check(candidate)`` code) run in
  the solution's namespace by a small runner, one result line per test.
- ``io``:   competitive-programming style, one sandboxed run per (stdin, expected stdout) pair;
  outputs are compared on the host line by line after stripping (as LiveCodeBench does).

Pass/fail never comes from the program's exit code or from what it prints: the call runner tags
each result line with a random token sent on stdin, and io outputs are compared outside the
sandbox, so ``sys.exit(0)``, printing "all tests passed", redefining ``check`` or deleting files
do not pass a test. (A program that reads the token from the runner's frame, e.g.
``sys._getframe(1).f_locals``, or from the interpreter's memory can still forge call-style
results; io-style tests are immune.)
"""
from __future__ import annotations

import ast
import json
import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

from agentopd.judges.base import BaseJudge, judge_error
from agentopd.sandbox import Limits, Sandbox, make_sandbox
from agentopd.types import ExecResult, Judgement, Problem, TestResult, Verdict

FIELD_CAP = 250
CRITIQUE_CAP = 2000

_RUNNER = r'''import json as _json, os as _os, sys as _sys
def _agentopd_run(_src, _setup, _tests):
    _tok = _sys.stdin.readline().strip()
    _out = _os.dup(1)
    _write, _dumps, _BaseException, _repr = _os.write, _json.dumps, BaseException, repr
    # bound before the solution runs: it may patch builtins (exec, compile, enumerate) to skip tests
    _exec, _compile, _enumerate = exec, compile, enumerate

    def _emit(*rec):
        _write(_out, ("\n" + _tok + " " + _dumps(rec) + "\n").encode())

    def _err(e):
        return (type(e).__name__ + ": " + str(e))[:1000]

    def _failed_assert(e, test):
        # the failing line of the test, and for `assert A == B` the values of A and B
        tb, frame = e.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<test>":
                frame, line = tb.tb_frame, tb.tb_lineno
            tb = tb.tb_next
        if frame is None:
            return test, "", ""
        src = test.splitlines()[line - 1].strip()
        try:
            import ast
            t = ast.parse(src).body[0].test
            if isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.Eq):
                got = eval(ast.get_source_segment(src, t.left), frame.f_globals, frame.f_locals)
                exp = eval(ast.get_source_segment(src, t.comparators[0]), frame.f_globals, frame.f_locals)
                return src, _repr(got)[:300], _repr(exp)[:300]
        except _BaseException:
            pass
        return src, "", ""

    try:
        _code = compile(_src, "solution.py", "exec")
    except SyntaxError as e:
        _emit("syntax_error", _err(e) + " (line " + str(e.lineno) + ")")
        return
    _g = {"__name__": "__solution__"}
    try:
        if _setup:
            exec(_setup, _g)
        exec(_code, _g)
    except _BaseException as e:
        _emit("load_error", "MemoryError" if isinstance(e, MemoryError) else _err(e))
        return
    for _i, _test in _enumerate(_tests):
        try:
            _exec(_compile(_test, "<test>", "exec"), _g)
            _emit("test", _i, "ok", "")
        except AssertionError as e:
            _emit("test", _i, "wrong_answer", str(e)[:300], *_failed_assert(e, _test))
        except _BaseException as e:
            _emit("test", _i, "memory" if isinstance(e, MemoryError) else "runtime_error", _err(e))
    _emit("done")
_agentopd_run(ARGS)
'''


def call_program(src: str, tests: list[str], setup: str = "") -> str:
    """The runner program for call-style tests around solution source ``src``."""
    return _RUNNER.replace("ARGS", ", ".join(map(repr, (src, setup, tests))))


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str | None:
    """The program in a model's answer: the last ```python fenced block (else the last fenced
    block; an unclosed fence runs to the end), else the whole text if it parses as Python."""
    blocks = _FENCE.findall(text)
    if blocks:
        py = [b for lang, b in blocks if lang.lower() in ("python", "py", "python3")]
        code = (py or [b for _, b in blocks])[-1]
        return code if code.strip() else None
    if not text.strip():
        return None
    try:
        ast.parse(text)
    except SyntaxError:
        return None
    return text


def outputs_match(got: str, expected: str) -> bool:
    """Compare stdout to the expected output line by line, ignoring surrounding whitespace."""
    a = [ln.strip() for ln in got.strip().splitlines()]
    b = [ln.strip() for ln in expected.strip().splitlines()]
    return a == b


def _cap(s: str, n: int = FIELD_CAP) -> str:
    s = s if len(s) <= n else s[: n - 15] + f"... [{len(s) - n + 15} more]"
    return s


def _syntax_error(program: str) -> str | None:
    """Compile (never run) the program on the host: a SyntaxError needs no sandbox run."""
    try:
        compile(program, "solution.py", "exec")
    except SyntaxError as e:
        return f"{type(e).__name__}: {e.msg} (line {e.lineno})"
    except (ValueError, RecursionError, MemoryError, OverflowError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _last_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class TestJudge(BaseJudge):
    """Judges code by running it against the problem's tests.

    ``extract``: pull the code out of a model's answer (fenced block or plain code); with
    ``extract=False`` the response is a completion that continues ``payload["prefix"]`` verbatim
    (HumanEval sample files). Score = fraction of tests passed; status ``ok`` only when all pass.
    """

    name = "tests"

    def __init__(self, sandbox: Sandbox | None = None, backend: str = "auto", timeout_s: float = 10.0,
                 memory_mb: int = 512, extract: bool = True, workers: int | None = None):
        self.sandbox = sandbox or make_sandbox(backend, workers=workers)
        self.limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb)
        self.extract = extract
        self.workers = workers or getattr(self.sandbox, "workers", 2)
        # one long-lived pool: a warm sandbox worker started from a thread dies with that thread
        # (bwrap --die-with-parent is PR_SET_PDEATHSIG, which fires on the *thread's* exit), so a
        # pool per call would kill the workers after every call and race the next call's runs
        self._pool = ThreadPoolExecutor(max_workers=self.workers)

    # ------------------------------------------------------------------ building the runs

    def _program(self, problem: Problem, response: str) -> str | None:
        prefix = problem.payload.get("prefix", "")
        if not self.extract:
            return prefix + response
        code = extract_code(response)
        if code is None:
            return None
        return prefix + "\n" + code if prefix else code

    def _jobs(self, problem: Problem, program: str) -> list[tuple[str, str, Limits]]:
        p = problem.payload
        if p["style"] == "call":
            return [(call_program(program, p["tests"], p.get("setup", "")), secrets.token_hex(16) + "\n", self.limits)]
        return [(program, t["input"], self.limits) for t in p["tests"]]

    # -------------------------------------------------------------------------- verdicts

    def _verdict_call(self, problem: Problem, res: ExecResult, token: str) -> Verdict:
        tests = problem.payload["tests"]
        total = len(tests)
        details: list[TestResult] = [TestResult("runtime_error", input=t) for t in tests]
        reported: set[int] = set()
        done, load = False, None
        for line in res.stdout.splitlines():
            if not line.startswith(token + " "):
                continue
            rec = json.loads(line[len(token) + 1:])
            if rec[0] == "test":
                _, i, status, msg, *where = rec
                line, got, exp = where if where else (tests[i], "", "")
                details[i] = TestResult(status, input=line or tests[i], expected=exp, got=got, error=msg)
                reported.add(i)
            elif rec[0] == "done":
                done = True
            else:
                load = rec
        passed = sum(d.status == "ok" for d in details)
        if load is not None:
            status = "syntax_error" if load[0] == "syntax_error" else (
                "memory" if load[1] == "MemoryError" else "runtime_error")
            return Verdict(0.0, 0, total, status, [TestResult(status, error=load[1])])
        if not done:
            # killed or exited part way: the first test without a result is the one that ran
            status = {"timeout": "timeout", "memory": "memory", "output_limit": "output_limit"}.get(
                res.status, "runtime_error")
            for i, d in enumerate(details):
                if i not in reported:
                    d.status = status
                    d.error = (_last_error_line(res.stderr) or "the program exited before its tests finished"
                               if status == "runtime_error" else status)
                    break
            return Verdict(passed / total if total else 0.0, passed, total, status, details)
        return self._summarise(details)

    def _verdict_io(self, problem: Problem, results: list[ExecResult]) -> Verdict:
        details = []
        for t, r in zip(problem.payload["tests"], results):
            if r.status == "ok":
                st = "ok" if outputs_match(r.stdout, t["output"]) else "wrong_answer"
                details.append(TestResult(st, input=t["input"], expected=t["output"], got=r.stdout))
            else:
                status = r.status if r.status in ("timeout", "memory", "output_limit") else "runtime_error"
                details.append(TestResult(status, input=t["input"], expected=t["output"], got=r.stdout,
                                          error=_last_error_line(r.stderr) if r.status != "timeout" else "timeout"))
        return self._summarise(details)

    @staticmethod
    def _summarise(details: list[TestResult]) -> Verdict:
        total = len(details)
        passed = sum(d.status == "ok" for d in details)
        bad = [d.status for d in details if d.status != "ok"]
        order = ("syntax_error", "runtime_error", "timeout", "memory", "output_limit", "wrong_answer")
        status = "ok" if not bad else min(bad, key=order.index)
        return Verdict(passed / total if total else 0.0, passed, total, status, details)

    # --------------------------------------------------------------------------- critique

    @staticmethod
    def critique(verdict: Verdict) -> str:
        """Online-judge style: failing tests only, errors and timeouts first, then up to two
        wrong answers with input / expected / got; every field and the whole text capped."""
        if verdict.status == "ok":
            return f"All {verdict.total} tests passed."
        if verdict.status == "format_error":
            return "No code found in the answer. Put the program in a ```python code block."
        if verdict.status == "syntax_error" and verdict.details and not verdict.details[0].input:
            return "Syntax error: " + _cap(verdict.details[0].error)
        parts = [f"{verdict.passed}/{verdict.total} tests passed."]
        fails = [(i, d) for i, d in enumerate(verdict.details) if d.status != "ok"]
        errors = [(i, d) for i, d in fails if d.status != "wrong_answer"]
        wrong = [(i, d) for i, d in fails if d.status == "wrong_answer"][:2]
        if verdict.status in ("runtime_error", "memory") and verdict.details and not verdict.details[0].input:
            parts.append(f"{verdict.status.replace('_', ' ').capitalize()} while loading the program: "
                         + _cap(verdict.details[0].error))
            errors = []  # that detail is the load error, not test 1's
        names = {"runtime_error": "Runtime error", "timeout": "Time limit exceeded", "memory": "Memory limit exceeded",
                 "output_limit": "Output limit exceeded", "syntax_error": "Syntax error"}
        for i, d in errors[:1]:
            block = f"{names.get(d.status, d.status)} on test {i + 1}:"
            if d.input:
                block += "\n  input: " + _cap(d.input)
            if d.error and d.status not in ("timeout",):
                block += "\n  error: " + _cap(d.error)
            parts.append(block)
        for i, d in wrong:
            block = f"Wrong answer on test {i + 1}:\n  input: {_cap(d.input)}"
            if d.expected or d.got:
                block += f"\n  expected: {_cap(d.expected)}\n  got: {_cap(d.got)}"
            elif d.error:
                block += "\n  error: " + _cap(d.error)
            parts.append(block)
        text = "\n".join(parts)
        return text if len(text) <= CRITIQUE_CAP else text[: CRITIQUE_CAP - 4] + " ..."

    # ------------------------------------------------------------------------- the API

    def judge(self, problem: Problem, response: str) -> Judgement:
        return self.judge_many([(problem, response)])[0]

    def judge_many(self, pairs: list[tuple[Problem, str]], progress=None) -> list[Judgement]:
        """Judge many (problem, response) pairs; all their sandbox runs share one pool."""
        plans = []  # (problem, program or None, [job indices])
        jobs = []
        for problem, response in pairs:
            program = self._program(problem, response)
            if program is None:
                plans.append((problem, None, []))
                continue
            syntax = _syntax_error(program)
            if syntax:
                plans.append((problem, syntax, []))
                continue
            js = self._jobs(problem, program)
            plans.append((problem, program, list(range(len(jobs), len(jobs) + len(js)))))
            jobs += js
        results = self._run_jobs(jobs, [len(idx) for _, _, idx in plans], progress)
        out = []
        for problem, program, idx in plans:
            total = len(problem.payload.get("tests", []))
            if program is None:
                out.append(Judgement(v := Verdict(0.0, 0, total, "format_error"), self.critique(v)))
            elif not idx:
                v = Verdict(0.0, 0, total, "syntax_error", [TestResult("syntax_error", error=program)])
                out.append(Judgement(v, self.critique(v)))
            elif any(results[i].status == "sandbox_error" for i in idx):
                err = next(results[i].stderr for i in idx if results[i].status == "sandbox_error")
                out.append(judge_error(f"sandbox failed: {err}", total))
            else:
                if problem.payload["style"] == "call":
                    v = self._verdict_call(problem, results[idx[0]], jobs[idx[0]][1].strip())
                else:
                    v = self._verdict_io(problem, [results[i] for i in idx])
                out.append(Judgement(v, self.critique(v)))
        return out

    def _run_jobs(self, jobs, counts: list[int], progress) -> list[ExecResult]:
        """Run all sandbox jobs on the pool; ``progress(1)`` as each sample's last run ends."""
        if progress:
            for c in counts:
                if c == 0:
                    progress(1)
        owner = [i for i, c in enumerate(counts) for _ in range(c)]
        left = list(counts)
        lock = threading.Lock()

        def run(k):
            res = self.sandbox.run(*jobs[k])
            if progress:
                with lock:
                    left[owner[k]] -= 1
                    if left[owner[k]] == 0:
                        progress(1)
            return res

        return list(self._pool.map(run, range(len(jobs))))

    def close(self):
        self._pool.shutdown(wait=True)
        self.sandbox.close()

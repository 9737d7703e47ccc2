"""The test judge: run a program against a problem's tests in a sandbox; a Verdict and a critique.

Two test styles (``problem.payload["style"]``):

- ``call``: test snippets (``assert f(1) == 2``, or HumanEval's ``check(candidate)`` code) run by
  a driver process that holds the tests and calls into the solution's process over a pipe;
  arguments and return values cross as data (agentopd/sandbox/calltests.py), one result line per test.
- ``io``:   competitive-programming style, one sandboxed run per (stdin, expected stdout) pair;
  outputs are compared on the host line by line after stripping (as LiveCodeBench does).

Pass/fail never comes from the program's exit code or from what it prints: the call-style results
are the driver's, written where the solution's process cannot reach (it never holds the tests, the
driver's memory or its stdout), and io outputs are compared outside the sandbox. A run that timed
out, crashed or hit a limit has that status whatever was reported before it.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

from agentopd.judges.base import BaseJudge, guarded, judge_error
from agentopd.judges.extract import extract_code, problem_code  # noqa: F401  (extract_code: this module's API too)

from agentopd.sandbox import KNOWN_PROGRAMS, Limits, Sandbox, make_sandbox
from agentopd.sandbox.workers import wall_limit
from agentopd.types import ExecResult, Judgement, Problem, TestResult, Verdict

FIELD_CAP = 250
CRITIQUE_CAP = 2000

_DRIVER = KNOWN_PROGRAMS[0]  # agentopd.sandbox.calltests: warm workers have it compiled already


def _frame(obj) -> str:
    data = json.dumps(obj)
    return f"{len(data.encode())}\n{data}"


def call_job(src: str, tests: list[str], setup: str = "") -> tuple[str, str]:
    """(program, stdin) of one sandbox run for call-style tests: the driver (agentopd.sandbox.calltests)
    is the program; stdin holds the solution, then the tests, which the driver reads only after
    the solution's process is forked off."""
    return _DRIVER, _frame({"src": src, "setup": setup}) + _frame({"tests": tests, "setup": setup})


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


class _DriverFailed(Exception):
    """The driver could not judge the sample: a test it cannot run as data calls, or its own
    crash (the judge's limit or failure, not the program's)."""


def _last_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class TestJudge(BaseJudge):
    """Judges code by running it against the problem's tests.

    ``extract``: pull the code out of a model's answer (:mod:`agentopd.judges.extract`); with
    ``extract=False`` the response is a completion that continues ``payload["prefix"]`` verbatim
    (HumanEval sample files). Score = fraction of tests passed; status ``ok`` only when all pass.

    ``timeout_s`` is CPU time (RLIMIT_CPU): a program that computes for longer times out whatever
    the machine's load, so the verdict of a program does not depend on how busy the machine is.
    A program that does not finish in :func:`agentopd.sandbox.workers.wall_limit` of wall-clock
    time (one that sleeps or blocks, or one starved by an extreme load) is stopped too, as a timeout.
    """

    name = "tests"

    def __init__(self, sandbox: Sandbox | None = None, backend: str = "auto", timeout_s: float = 10.0,
                 memory_mb: int = 512, extract: bool = True, workers: int | None = None):
        self.sandbox = sandbox or make_sandbox(backend, workers=workers)
        self.limits = Limits(timeout_s=wall_limit(timeout_s), cpu_s=timeout_s, memory_mb=memory_mb)
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
        code = problem_code(problem, response)
        if code is None:
            return None
        return prefix + "\n" + code if prefix else code

    def _jobs(self, problem: Problem, program: str) -> list[tuple[str, str, Limits]]:
        p = problem.payload
        if p["style"] == "call":
            return [(*call_job(program, p["tests"], p.get("setup", "")), self.limits)]
        return [(program, t["input"], self.limits) for t in p["tests"]]

    # -------------------------------------------------------------------------- verdicts

    def _verdict_call(self, problem: Problem, res: ExecResult) -> Verdict:
        """From the driver's result lines (the program cannot write them). A run that timed out,
        crashed or hit a limit has that status, whatever the driver reported before it."""
        tests = problem.payload["tests"]
        total = len(tests)
        details: list[TestResult] = [TestResult("runtime_error", input=t) for t in tests]
        reported: set[int] = set()
        recs = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
        for rec in recs:
            if rec[0] == "test":
                _, i, status, msg, *where = rec
                line, got, exp = where if where else (tests[i], "", "")
                details[i] = TestResult(status, input=line or tests[i], expected=exp, got=got, error=msg)
                reported.add(i)
            elif rec[0] == "load_error":  # (a limit that ended the load is the status: e.g. its CPU time)
                status = res.status if res.status in ("timeout", "memory", "output_limit") else rec[1]
                return Verdict(0.0, 0, total, status, [TestResult(status, error=rec[2])])
            elif rec[0] == "unsupported":
                raise _DriverFailed(rec[1])
        if not recs and res.exit_code == 1 and "Traceback" in res.stderr:  # only the driver writes there
            raise _DriverFailed(f"the call-test driver failed: {_last_error_line(res.stderr)}")
        if res.status != "ok" or recs[-1:] != [["done"]]:
            status = {"timeout": "timeout", "memory": "memory", "output_limit": "output_limit"}.get(
                res.status, "runtime_error")
            limit = status != "runtime_error"  # the run's limit ended the test it was in, whatever it reported
            first = next((i for i in range(total) if i not in reported or limit and details[i].status != "ok"), None)
            if first is not None:
                details[first].status = status
                details[first].error = (_last_error_line(res.stderr) or "the tests did not finish"
                                        if status == "runtime_error" else status)
            passed = sum(d.status == "ok" for d in details)
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

    def _plan(self, problem: Problem, response: str) -> Judgement | list:
        """A sample's verdict when no run is needed (no code, a syntax error), else its runs."""
        total = len(problem.payload["tests"])
        program = self._program(problem, response)
        if program is None:
            v = Verdict(0.0, 0, total, "format_error")
            return Judgement(v, self.critique(v))
        syntax = _syntax_error(program)
        if syntax:
            v = Verdict(0.0, 0, total, "syntax_error", [TestResult("syntax_error", error=syntax)])
            return Judgement(v, self.critique(v))
        return self._jobs(problem, program)

    def _judgement(self, problem: Problem, results: list[ExecResult]) -> Judgement:
        failed = next((r for r in results if r.status == "sandbox_error"), None)
        if failed is not None:
            return judge_error(f"sandbox failed: {failed.stderr}", len(problem.payload["tests"]))
        if problem.payload["style"] == "call":
            v = self._verdict_call(problem, results[0])
        else:
            v = self._verdict_io(problem, results)
        return Judgement(v, self.critique(v))

    def judge_many(self, pairs: list[tuple[Problem, str]], progress=None) -> list[Judgement]:
        """Judge many (problem, response) pairs; all their sandbox runs share one pool. Whatever
        fails while judging one sample makes that sample a ``judge_error``, never the batch."""
        plans = []  # a Judgement already, or the indices of the sample's jobs
        jobs: list = []
        for problem, response in pairs:
            plan = guarded(self._plan, problem, response)
            if isinstance(plan, Judgement):
                plans.append(plan)
                continue
            plans.append(list(range(len(jobs), len(jobs) + len(plan))))
            jobs += plan
        results = self._run_jobs(jobs, [0 if isinstance(p, Judgement) else len(p) for p in plans], progress)
        return [plan if isinstance(plan, Judgement) else guarded(self._judgement, problem, [results[i] for i in plan])
                for (problem, _), plan in zip(pairs, plans)]

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
            try:
                res = self.sandbox.run(*jobs[k])
            except Exception as e:  # noqa: BLE001 -- a sandbox that raises fails this run only
                res = ExecResult("sandbox_error", None, "", f"{type(e).__name__}: {e}", False, False, False, 0.0)
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

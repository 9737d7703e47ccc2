"""The test judge (agentopd/judges/tests.py) on real problems, in the real bwrap sandbox: call-style and
io-style verdicts, critiques and their caps, code extraction, and reward-hacking attempts."""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from agentopd.envs.data import load_code_problems, load_humaneval
from agentopd.judges.tests import CRITIQUE_CAP, FIELD_CAP, extract_code, outputs_match
from agentopd.judges.tests import (
    TestJudge as Judge,  # (a Test* name would be collected by pytest)
)
from sandbox_probe import bwrap_or_skip

from agentopd.types import Problem

SAMPLES = Path(__file__).resolve().parent / "data" / "sandboxfusion-samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample data not found at {SAMPLES}")


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def judges():
    """``judges(**kw)``: TestJudges that share one bwrap sandbox; all live until the module ends
    (so no judge's thread pool exits while another judge still uses the sandbox's workers)."""
    sb = bwrap_or_skip()
    made: dict[tuple, Judge] = {}

    def get(**kw) -> Judge:
        kw.setdefault("timeout_s", 2.0)
        key = tuple(sorted(kw.items()))
        if key not in made:
            made[key] = Judge(sandbox=sb, **kw)
        return made[key]

    yield get
    for j in made.values():
        j.close()
    sb.close()


@pytest.fixture(scope="module")
def judge(judges):
    return judges()


@pytest.fixture(scope="module")
def mbpp():
    if not SAMPLES.is_dir():
        pytest.skip(f"sample data not found at {SAMPLES}")
    return load_code_problems(str(SAMPLES / "mbpp-20.jsonl"))


@pytest.fixture(scope="module")
def remove_occ(mbpp):
    """MBPP 11: remove_Occ(s, ch) removes the first and last occurrence of ch; three asserts."""
    p = next(p for p in mbpp if p.id == "11")
    assert len(p.payload["tests"]) == 3
    return p


@pytest.fixture(scope="module")
def he0():
    return load_humaneval()[0]  # has_close_elements


def fenced(code: str, lang: str = "python") -> str:
    return f"Here is my solution.\n```{lang}\n{code}\n```\nIt should work."


SUM_PROBLEM = Problem("sum", "Read two integers, print their sum.", "code", {
    "style": "io", "tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 7\n", "output": "12\n"},
                             {"input": "-4 4\n", "output": "0\n"}]})
SUM_OK = "a, b = map(int, input().split())\nprint(a + b)\n"


# ------------------------------------------------------------------------------- call style


@needs_samples
def test_mbpp_canonical_solutions_pass(judge, mbpp):
    js = judge.judge_many([(p, fenced(p.privileged["solution"])) for p in mbpp])
    bad = {p.id: j.critique for p, j in zip(mbpp, js) if j.verdict.status != "ok"}
    assert not bad
    for p, j in zip(mbpp, js):
        assert j.verdict.score == 1.0 and j.verdict.passed == j.verdict.total == len(p.payload["tests"])
        assert j.critique == f"All {j.verdict.total} tests passed."


@needs_samples
def test_wrong_answer_critique_shows_input_expected_got(judge, remove_occ):
    j = judge.judge(remove_occ, fenced("def remove_Occ(s, ch):\n    return s"))
    v = j.verdict
    assert v.status == "wrong_answer" and v.passed == 0 and v.score == 0.0 and not v.success
    assert j.critique.startswith("0/3 tests passed.")
    assert 'Wrong answer on test 1:\n  input: assert remove_Occ("hello","l") == "heo"' in j.critique
    assert "expected: 'heo'" in j.critique and "got: 'hello'" in j.critique
    assert j.critique.count("Wrong answer on test") == 2  # at most two shown, three failed


@needs_samples
def test_only_failing_tests_are_shown(judge, remove_occ):
    code = remove_occ.privileged["solution"].replace("def remove_Occ(", "def _good(") + (
        "\ndef remove_Occ(s, ch):\n    return 'x' if s == 'abcda' else _good(s, ch)\n")
    j = judge.judge(remove_occ, fenced(code))
    v = j.verdict
    assert (v.status, v.passed, v.total) == ("wrong_answer", 2, 3)
    assert v.score == pytest.approx(2 / 3)
    assert [d.status for d in v.details] == ["ok", "wrong_answer", "ok"]
    assert "Wrong answer on test 2:" in j.critique and "got: 'x'" in j.critique
    assert "hello" not in j.critique and "PHP" not in j.critique and "test 1" not in j.critique


@needs_samples
def test_runtime_error_status_and_listed_first(judge, remove_occ):
    code = "def remove_Occ(s, ch):\n    if s == 'abcda':\n        return 1 / 0\n    return s\n"
    j = judge.judge(remove_occ, fenced(code))
    v = j.verdict
    assert v.status == "runtime_error"  # an error outranks wrong answers
    assert [d.status for d in v.details] == ["wrong_answer", "runtime_error", "wrong_answer"]
    c = j.critique
    assert "Runtime error on test 2:" in c and "ZeroDivisionError: division by zero" in c
    assert c.index("Runtime error on test 2") < c.index("Wrong answer on test 1") < c.index("Wrong answer on test 3")


@needs_samples
def test_error_while_loading_is_not_reported_as_a_test(judge, remove_occ):
    j = judge.judge(remove_occ, fenced("x = [][1]\ndef remove_Occ(s, ch):\n    return s * x"))
    assert j.verdict.status == "runtime_error" and j.verdict.passed == 0 and j.verdict.total == 3
    assert "while loading the program: IndexError: list index out of range" in j.critique
    assert "on test 1" not in j.critique


@needs_samples
def test_infinite_loop_times_out(judges, remove_occ):
    j = judges(timeout_s=1.0).judge(remove_occ, fenced("def remove_Occ(s, ch):\n    while True:\n        pass"))
    assert j.verdict.status == "timeout" and j.verdict.passed == 0
    assert "Time limit exceeded on test 1:" in j.critique


@needs_samples
def test_syntax_error(judge, remove_occ):
    j = judge.judge(remove_occ, fenced("def remove_Occ(s, ch)\n    return s"))
    assert j.verdict.status == "syntax_error" and j.verdict.score == 0.0 and j.verdict.total == 3
    assert j.critique.startswith("Syntax error: ") and "line 1" in j.critique


@needs_samples
@pytest.mark.parametrize("answer", ["I don't know how to solve this.", "", "   \n", "```python\n\n```"])
def test_no_code_is_a_format_error(judge, remove_occ, answer):
    j = judge.judge(remove_occ, answer)
    assert j.verdict.status == "format_error" and j.verdict.score == 0.0 and j.verdict.total == 3
    assert "No code found" in j.critique


@pytest.mark.parametrize("text, code", [
    ("```python\nprint(1)\n```", "print(1)\n"),
    ("Sure:\n```py\nprint(1)\n```\nDone.", "print(1)\n"),
    ("```\nprint(2)\n```", "print(2)\n"),
    ("text\n```python\nprint(3)\nprint(4)", "print(3)\nprint(4)\n"),  # unclosed fence: to the end
    ("```python\nprint(1)\n```\nor better\n```python\nprint(2)\n```", "print(2)\n"),
    ("```python\nprint(1)\n```\nOutput:\n```text\n1\n```", "print(1)\n"),  # last *python* block
    ("```\nprint(1)\n```\n```\nprint(2)\n```", "print(2)\n"),  # no python block: the last block of code
    ("```\nfirst\n```\n```\nsecond\n```", None),  # bare words compile, but are not code
    ("def f(x):\n    return x + 1\n", "def f(x):\n    return x + 1\n"),  # plain code
    ("This is prose, not code.", None),
    ("", None),
])
def test_extract_code(text, code):
    assert extract_code(text) == code


@needs_samples
def test_plain_code_and_unclosed_fence_are_judged(judge, remove_occ):
    sol = remove_occ.privileged["solution"]
    assert judge.judge(remove_occ, sol).verdict.status == "ok"
    assert judge.judge(remove_occ, "Solution:\n```python\n" + sol).verdict.status == "ok"
    two = "```python\ndef remove_Occ(s, ch):\n    return s\n```\nFixed:\n```python\n" + sol + "\n```"
    assert judge.judge(remove_occ, two).verdict.status == "ok"
    assert judge.judge(remove_occ, "```python\n" + sol + "\n```\nFixed:\n```python\n"
                       "def remove_Occ(s, ch):\n    return s\n```").verdict.status == "wrong_answer"


# --------------------------------------------------------------------------------- io style


@needs_samples
def test_code_contests_trivially_wrong_program(judge):
    problems = load_code_problems(str(SAMPLES / "code_contests-20.jsonl"))[:4]
    assert all(p.payload["style"] == "io" and len(p.payload["tests"]) > 2 for p in problems)
    for j, p in zip(judge.judge_many([(p, fenced("print(0)")) for p in problems]), problems):
        assert j.verdict.status == "wrong_answer" and j.verdict.passed < j.verdict.total == len(p.payload["tests"])
        assert 1 <= j.critique.count("Wrong answer on test") <= 2
        assert len(j.critique) <= CRITIQUE_CAP and "got: 0" in j.critique


def test_own_io_problem_from_jsonl(judge, tmp_path):
    f = tmp_path / "sum.jsonl"
    f.write_text(json.dumps({"id": "sum", "prompt": "Print a+b.", "tests": SUM_PROBLEM.payload["tests"]}) + "\n")
    (p,) = load_code_problems(str(f))
    assert p.payload["style"] == "io"
    j = judge.judge(p, fenced(SUM_OK))
    assert (j.verdict.status, j.verdict.passed, j.verdict.total, j.verdict.score) == ("ok", 3, 3, 1.0)
    j = judge.judge(p, fenced("a, b = map(int, input().split())\nprint(a - b)"))
    assert j.verdict.status == "wrong_answer" and j.verdict.passed == 0
    assert "expected: 3" in j.critique and "got: -1" in j.critique


def test_io_runtime_error_and_timeout(judges):
    j = judges().judge(SUM_PROBLEM, fenced("a, b = map(int, input().split())\nprint((a + b) // (a + b) * (a + b))"))
    assert j.verdict.status == "runtime_error" and j.verdict.passed == 2  # only -4 4 divides by zero
    assert "Runtime error on test 3:" in j.critique and "ZeroDivisionError" in j.critique
    prog = "a, b = map(int, input().split())\nwhile a == 5:\n    pass\nprint(a + b + 1)"
    j = judges(timeout_s=1.0).judge(SUM_PROBLEM, fenced(prog))
    assert j.verdict.status == "timeout" and [d.status for d in j.verdict.details] == [
        "wrong_answer", "timeout", "wrong_answer"]
    c = j.critique
    assert c.index("Time limit exceeded on test 2") < c.index("Wrong answer on test 1") < c.index("Wrong answer on test 3")


@pytest.mark.parametrize("got, expected, same", [
    ("3\n", "3\n", True), ("3", "3\n", True), ("3\n\n\n", "3", True), ("3   \n", "3\n", True),
    ("1\n2\n", "1\n2", True), ("1 \n2\t\n\n", "1\n2\n", True),
    ("4\n", "3\n", False), ("1\n2\n", "1\n3\n", False), ("1 2\n", "12\n", False), ("1\n2\n", "1\n", False),
    ("", "3\n", False), ("1\n\n2\n", "1\n2\n", False),
])
def test_outputs_match(got, expected, same):
    assert outputs_match(got, expected) is same


def test_io_comparison_ignores_trailing_whitespace_not_content(judge):
    trailing = "a, b = map(int, input().split())\nprint(str(a + b) + '   ')\nprint()\nprint('\\n\\n')"
    assert judge.judge(SUM_PROBLEM, fenced(trailing)).verdict.status == "ok"
    extra = "a, b = map(int, input().split())\nprint(a + b)\nprint('done')"
    assert judge.judge(SUM_PROBLEM, fenced(extra)).verdict.status == "wrong_answer"


# ------------------------------------------------------------------------------ critique caps

_MARK = re.compile(r"\.\.\. \[(\d+) more\]$")


def test_critique_field_and_total_caps(judge):
    n = 1000
    tests = [{"input": "E" + "i" * n, "output": "o" * n}] + [
        {"input": c * n, "output": "o" * n} for c in "abcd"]
    prob = Problem("big", "big", "code", {"style": "io", "tests": tests})
    prog = "s = input()\nif s[0] == 'E':\n    raise ValueError('e' * 1000)\nprint('g' * 1000)\n"
    j = judge.judge(prob, fenced(prog))
    v, c = j.verdict, j.critique
    assert v.status == "runtime_error" and v.passed == 0 and v.total == 5
    assert len(c) <= CRITIQUE_CAP
    # the error block first, then (as far as the cap allows) wrong answers on tests 2 and 3 only
    assert c.index("Runtime error on test 1") < c.index("Wrong answer on test 2")
    assert "test 4" not in c and "test 5" not in c and "cccc" not in c
    if c.endswith(" ..."):  # the whole-text cap cut the last field short
        c = c[: c.rindex("\n")]
    fields = re.findall(r"^  (?:input|expected|got|error): (.*)$", c, re.M)
    assert len(fields) >= 4
    originals = {"E": n + 1, "V": len("ValueError: ") + n, "a": n, "b": n, "o": n, "g": n + 1}
    for f in fields:
        m = _MARK.search(f)
        assert m, f  # every field here is longer than the cap
        kept = len(f) - len(m.group(0))
        assert kept <= FIELD_CAP and len(f) <= FIELD_CAP + len(" [9999 more]")
        assert kept + int(m.group(1)) == originals[f[0]]  # the marker counts exactly what was cut


def test_short_fields_are_not_capped(judge):
    j = judge.judge(SUM_PROBLEM, fenced("print(42)"))
    assert "more]" not in j.critique and "expected: 3" in j.critique and "got: 42" in j.critique


# ---------------------------------------------------------------------------- reward hacking

HACKS = {
    "sys_exit_at_module_level": "    return None\nimport sys\nsys.exit(0)\n",
    "os_exit_at_module_level": "    return None\nimport os\nos._exit(0)\n",
    "sys_exit_in_function": "    import sys\n    sys.exit(0)\n",
    "os_exit_in_function": "    import os\n    os._exit(0)\n",
    "fake_result_lines": ("    return None\nprint('all tests passed')\n"
                          "print('\\n' + 'a' * 32 + ' [\"test\", 0, \"ok\", \"\"]')\nprint('deadbeef [\"done\"]')\n"),
    "fake_lines_then_os_exit": ("    return None\nimport os\n"
                                "os.write(1, ('\\n' + '0' * 32 + ' [\"test\", 0, \"ok\", \"\"]\\n' + '0' * 32 + "
                                "' [\"done\"]\\nall tests passed\\n').encode())\nos._exit(0)\n"),
    "read_stdin_for_token": ("    return None\nimport os, sys\ntok = sys.stdin.read().strip() or 'x'\n"
                             "os.write(1, ('\\n' + tok + ' [\"test\", 0, \"ok\", \"\"]\\n' + tok + ' [\"done\"]\\n')"
                             ".encode())\nos._exit(0)\n"),
    "check_is_a_noop": "    return None\ncheck = lambda c: None\n",
    "builtin_check_noop": "    return None\nimport builtins\nbuiltins.check = lambda c: None\n",
    "patch_assertion_error": ("    return None\nimport builtins\nclass _Quiet(Exception):\n    pass\n"
                              "builtins.AssertionError = _Quiet\n"),
    "patch_exec": "    return None\nimport builtins\nbuiltins.exec = lambda *a, **k: None\n",
    "patch_compile": ("    return None\nimport builtins\n_c = builtins.compile\n"
                      "builtins.compile = lambda s, f, m, *a, **k: _c('pass', f, m)\n"),
    "patch_enumerate": "    return None\nimport builtins\nbuiltins.enumerate = lambda it: iter([(0, 'pass')])\n",
    "delete_files": ("    return None\nimport os, glob\n"
                     "[os.remove(f) for f in glob.glob('**', recursive=True) if os.path.isfile(f)]\n"
                     "[os.remove(f) for f in glob.glob('/tmp/**', recursive=True) if os.path.isfile(f)]\n"),
    "overwrite_files": ("    return None\nimport glob\nfor f in glob.glob('**', recursive=True):\n"
                        "    try:\n        open(f, 'w').write('def check(c):\\n    pass\\n')\n"
                        "    except OSError:\n        pass\n"),
}
KILLERS = {
    "kill_parent": "    return None\nimport os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "kill_all": "    return None\nimport os, signal\nos.kill(-1, signal.SIGKILL)\n",
}


@pytest.mark.parametrize("name", sorted(HACKS))
def test_humaneval_hacks_do_not_pass(judges, he0, name):
    j = judges(extract=False).judge(he0, HACKS[name])
    assert j.verdict.status not in ("ok", "judge_error"), j.critique
    assert j.verdict.passed == 0 and j.verdict.score == 0.0


@pytest.mark.parametrize("name", sorted(KILLERS))
def test_killing_the_sandbox_does_not_pass(judges, he0, name):
    j = judges(extract=False).judge(he0, KILLERS[name])
    assert j.verdict.status != "ok" and j.verdict.passed == 0


# the warm worker is pid 1 of its sandbox: a program cannot kill it to turn its wrong answer into
# a judge_error (which would drop the sample instead of scoring it 0)
@pytest.mark.parametrize("name", sorted(KILLERS))
def test_killing_the_sandbox_is_not_a_judge_error(judges, he0, name):
    assert judges(extract=False).judge(he0, KILLERS[name]).verdict.status != "judge_error"


def test_humaneval_canonical_still_passes_after_hacks(judges, he0):
    # the same warm workers ran the hacks above: they must not have been poisoned
    js = judges(extract=False).judge_many([(he0, he0.privileged["solution"])] * 4)
    assert [j.verdict.status for j in js] == ["ok"] * 4


# forging through the runner's frames, its memory, stdin or files: tests/test_forging.py


@needs_samples
def test_mbpp_exit_hack_does_not_pass(judge, remove_occ):
    for hack in ("import sys\nprint('all tests passed')\nsys.exit(0)\n", "import os\nos._exit(0)\n"):
        # at the top level the extractor drops it (the function is judged: wrong); in the function it runs
        j = judge.judge(remove_occ, fenced("def remove_Occ(s, ch):\n    return s\n" + hack))
        assert j.verdict.status == "wrong_answer" and j.verdict.passed == 0
        j = judge.judge(remove_occ, fenced("def remove_Occ(s, ch):\n" + textwrap.indent(hack, "    ") + "    return s\n"))
        assert j.verdict.status == "runtime_error" and j.verdict.passed == 0


@pytest.mark.parametrize("prog", [
    "import sys\nprint('all tests passed')\nsys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "import os\nos.write(1, b'all tests passed\\n')\nos._exit(0)\n",
    "import sys\nsys.stdout.write('ok\\n')\nsys.exit(0)\n",
    "import os, glob\n[os.remove(f) for f in glob.glob('**', recursive=True) if os.path.isfile(f)]\n",
])
def test_io_early_exit_does_not_pass(judge, prog):
    j = judge.judge(SUM_PROBLEM, fenced(prog))
    assert j.verdict.status == "wrong_answer" and j.verdict.passed == 0


def test_back_to_back_calls_have_no_judge_errors(judge):
    # regression: with a thread pool per judge_many call, warm workers died with the pool's threads
    progs = [SUM_OK, "import os\nos._exit(0)", "import sys\nprint(3)\nsys.exit(0)", "print(input())"]
    statuses = [judge.judge(SUM_PROBLEM, fenced(p)).verdict.status for _ in range(8) for p in progs]
    assert statuses == ["ok", "wrong_answer", "wrong_answer", "wrong_answer"] * 8


# ------------------------------------------------------------------- one sample's failure


class _Breaks:
    """A sandbox around a real one that fails in a different way for each marked program."""

    def __init__(self, real):
        self.real = real

    def run(self, program, stdin="", limits=None):
        from agentopd.types import ExecResult

        if "RAISE" in stdin:
            raise RuntimeError("sandbox exploded")
        if "TORN" in stdin:  # the driver gets a request it cannot read: its crash is the judge's
            stdin = stdin[:stdin.index("\n") + 5]
        res = self.real.run(program, stdin, limits)
        if "GARBAGE" in stdin:  # result lines the judge cannot read: bad JSON, an index out of range
            return ExecResult("ok", 0, '["test", 7, "ok", ""]\n{not json\n["done"]\n', "", False, False, False, 0.0)
        return res


def test_a_crashing_sample_is_a_judge_error_and_the_batch_survives(judge, he0):
    breaking = Judge(sandbox=_Breaks(judge.sandbox), extract=False, timeout_s=2.0)
    good = (he0, he0.privileged["solution"])
    broken_payload = Problem("bad", "bad", "code", {"style": "call"})  # no tests at all
    pairs = [good, (he0, he0.privileged["solution"] + "\n# RAISE\n"), good,
             (he0, he0.privileged["solution"] + "\n# GARBAGE\n"), (broken_payload, "x = 1"), good,
             (he0, he0.privileged["solution"] + "\n# TORN\n")]
    try:
        js = breaking.judge_many(pairs)
    finally:
        breaking._pool.shutdown()
    assert [j.verdict.status for j in js] == ["ok", "judge_error", "ok", "judge_error", "judge_error", "ok",
                                              "judge_error"]
    assert "the call-test driver failed" in js[6].verdict.details[0].error
    assert "sandbox exploded" in js[1].verdict.details[0].error
    assert "judge failed on this sample" in js[3].verdict.details[0].error
    assert "KeyError" in js[4].verdict.details[0].error


def test_judges_without_a_sandbox_isolate_samples_too():
    from agentopd.judges.base import BaseJudge, ByKindJudge

    from agentopd.types import Judgement, Verdict

    class Picky(BaseJudge):
        def judge(self, problem, response):
            if response == "boom":
                raise ZeroDivisionError("scorer divided by zero")
            return Judgement(Verdict(1.0, 1, 1, "ok"), "")

    code = Problem("c", "c", "code", {})
    odd = Problem("o", "o", "poetry", {})
    js = ByKindJudge({"code": Picky()}).judge_many([(code, "fine"), (code, "boom"), (odd, "fine"), (code, "fine")])
    assert [j.verdict.status for j in js] == ["ok", "judge_error", "judge_error", "ok"]
    assert "ZeroDivisionError" in js[1].verdict.details[0].error and "poetry" in js[2].verdict.details[0].error

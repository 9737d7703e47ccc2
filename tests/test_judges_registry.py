"""The judge registry (agentopd/judges/base.py): names, dicts, import paths, ``register``, entry points,
errors with suggestions, the ``agentopd judges`` command; the composite judge; ``ByKindJudge``;
and the copyable custom judge in examples/ruff_judge.py."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

import agentopd.judges.base as base
from agentopd.judges import BaseJudge, available, make_judge, register, resolve
from agentopd.judges.base import ByKindJudge, judge_error
from agentopd.judges.composite import CompositeJudge
from agentopd.judges.llm import LLMJudge
from agentopd.judges.math import MathJudge
from agentopd.judges.tests import TestJudge as TJudge  # (a Test* name would be collected by pytest)
from agentopd.types import Judgement, Problem, Verdict

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- helpers


class Const(BaseJudge):
    """Always the same verdict; records what it judged."""

    def __init__(self, score: float = 0.5, status: str = "ok", critique: str = "const says hi"):
        self.score, self.status, self.critique = score, status, critique
        self.seen: list[tuple[str, str]] = []
        self.closed = False

    def judge(self, problem, response):
        self.seen.append((problem.id, response))
        if self.status == "judge_error":
            return judge_error(self.critique)
        return Judgement(Verdict(self.score, int(self.status == "ok"), 1, self.status), self.critique)

    def close(self):
        self.closed = True


@pytest.fixture(autouse=True)
def _isolated_registry(monkeypatch):
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(base, "_REGISTERED", dict(base._REGISTERED))


@pytest.fixture(scope="module")
def tests_judge():
    """``make_judge('tests')`` with no arguments: the default sandbox; shared by the module."""
    j = make_judge("tests")
    probe = j.judge(ADD, CLEAN)
    if probe.verdict.status != "ok":
        j.close()
        pytest.skip(f"no working sandbox here: {probe.verdict} {probe.critique}")
    yield j
    j.close()


@pytest.fixture(scope="module")
def ruff_judge(tests_judge):
    """The example judge by import path, on the module's sandbox."""
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(REPO))
    j = make_judge("examples.ruff_judge:RuffStyleJudge", sandbox=tests_judge.sandbox, style_weight=0.1)
    yield j
    j.tests._pool.shutdown(wait=True)  # not j.close(): the sandbox belongs to tests_judge
    mp.undo()


ADD = Problem("add", "Write add(a, b) that returns a + b.", "code",
              {"style": "call", "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]})
MATHP = Problem("m", "1/2 as a decimal?", "math", {"answer": "0.5"})
CLEAN = "```python\ndef add(a, b):\n    return a + b\n```"
UNUSED_IMPORT = "```python\nimport os\n\n\ndef add(a, b):\n    return a + b\n```"
FAILING = "```python\ndef add(a, b):\n    return a - b\n```"


# ---------------------------------------------------------------------------------- registry


def test_make_judge_by_name(tests_judge):
    assert isinstance(tests_judge, TJudge)
    assert tests_judge.judge(ADD, FAILING).verdict.status == "wrong_answer"


def test_make_judge_from_a_dict():
    j = make_judge({"name": "math", "reveal_answer": True, "timeout_s": 2.5})
    try:
        assert isinstance(j, MathJudge) and j.reveal_answer is True and j.verifier.timeout_s == 2.5
    finally:
        j.close()
    j = make_judge({"type": "math"}, reveal_answer=False)  # "type" also names it; kwargs merge in
    try:
        assert isinstance(j, MathJudge) and j.reveal_answer is False
    finally:
        j.close()
    with pytest.raises(ValueError, match="needs a 'name'"):
        make_judge({"reveal_answer": True})


def test_make_judge_passes_objects_through_and_refuses_junk():
    c = Const()
    assert make_judge(c) is c
    with pytest.raises(ValueError, match="cannot make a judge"):
        make_judge(42)


def test_builtins_resolve_to_their_classes():
    assert resolve("tests") is TJudge and resolve("math") is MathJudge
    assert resolve("llm") is LLMJudge and resolve("composite") is CompositeJudge
    av = available()
    for name in ("tests", "math", "llm", "composite"):
        assert name in av and ":" in av[name]


def test_import_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from examples.ruff_judge import RuffStyleJudge

    assert resolve("examples.ruff_judge:RuffStyleJudge") is RuffStyleJudge
    with pytest.raises(ValueError, match="has no Nope"):
        resolve("examples.ruff_judge:Nope")
    with pytest.raises(ValueError, match="cannot import"):
        resolve("agentopd_no_such_module_xyz:Judge")


def test_register_decorator():
    @register("mine")
    class Mine(Const):
        pass

    assert Mine.__name__ == "Mine"  # the decorator returns the class itself
    j = make_judge("mine", score=0.25)
    assert isinstance(j, Mine) and j.score == 0.25
    j2 = make_judge({"name": "mine", "status": "wrong_answer"})
    assert j2.judge(ADD, "x").verdict.status == "wrong_answer"
    assert available()["mine"].endswith(":test_register_decorator.<locals>.Mine")


def test_registration_does_not_leak_between_tests():
    assert "mine" not in available()


@pytest.mark.parametrize("typo, suggestion", [("mth", "math"), ("test", "tests"), ("composit", "composite"),
                                              ("lm", "llm")])
def test_unknown_name_suggests_the_closest(typo, suggestion):
    with pytest.raises(ValueError, match=f"did you mean '{suggestion}'") as e:
        make_judge(typo)
    assert f"unknown judge '{typo}'" in str(e.value) and "import path" in str(e.value)


def test_unknown_name_without_a_close_match_lists_the_known():
    with pytest.raises(ValueError) as e:
        make_judge("zzzqqqxx")
    assert "did you mean" not in str(e.value)
    assert all(n in str(e.value) for n in ("tests", "math", "llm", "composite"))


def test_bad_kwargs_name_the_judge():
    with pytest.raises(ValueError, match=r"judge 'math'.*bogus"):
        make_judge("math", bogus=1)
    with pytest.raises(ValueError, match=r"judge 'llm'.*nonsense"):
        make_judge({"name": "llm", "nonsense": 2})

    @register("mine")
    class Mine(Const):
        pass

    with pytest.raises(ValueError, match=r"judge 'mine'.*wrong_kw"):
        make_judge("mine", wrong_kw=3)


# ------------------------------------------------------------------------------ entry points


EP_MODULE = '''
from agentopd.judges import BaseJudge
from agentopd.types import Judgement, Verdict


class EPJudge(BaseJudge):
    def __init__(self, bonus=0.0):
        self.bonus = bonus

    def judge(self, problem, response):
        return Judgement(Verdict(min(1.0, 0.5 + self.bonus), 1, 1, "ok"), "from an entry point")
'''


def test_entry_point_judge(tmp_path, monkeypatch):
    (tmp_path / "agentopd_ep_judge_mod.py").write_text(EP_MODULE)
    dist = tmp_path / "agentopd_test_ep_dist-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: agentopd-test-ep-dist\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[agentopd.judges]\nfromep = agentopd_ep_judge_mod:EPJudge\n")
    assert "fromep" not in available()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert available()["fromep"] == "agentopd_ep_judge_mod:EPJudge"
    j = make_judge("fromep", bonus=0.25)
    assert type(j).__name__ == "EPJudge" and j.bonus == 0.25
    out = j.judge(ADD, "x")
    assert out.verdict.score == 0.75 and out.critique == "from an entry point"
    assert make_judge({"name": "fromep"}).bonus == 0.0
    with pytest.raises(ValueError, match="judge 'fromep'"):
        make_judge("fromep", nope=1)


def test_entry_point_to_the_example_judge(tmp_path, monkeypatch, tests_judge):
    dist = tmp_path / "agentopd_test_ep2-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: agentopd-test-ep2\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[agentopd.judges]\nruff-style = examples.ruff_judge:RuffStyleJudge\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(REPO))
    assert available()["ruff-style"] == "examples.ruff_judge:RuffStyleJudge"
    assert resolve("ruff-style").__name__ == "RuffStyleJudge"


# -------------------------------------------------------------------------------------- CLI


def test_cli_lists_the_judges():
    r = subprocess.run([sys.executable, "-m", "agentopd.cli", "judges"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = dict(line.split(None, 1) for line in r.stdout.splitlines() if line.strip())
    assert rows["tests"].strip() == "agentopd.judges.tests:TestJudge"
    assert rows["math"].strip() == "agentopd.judges.math:MathJudge"
    assert rows["llm"].strip() == "agentopd.judges.llm:LLMJudge"
    assert rows["composite"].strip() == "agentopd.judges.composite:CompositeJudge"


# -------------------------------------------------------------------------------- composite


def test_composite_weighted_score_and_joined_critiques(tests_judge):
    style = Const(0.0, "ok", "STYLE: could be nicer")
    comp = CompositeJudge([{"judge": tests_judge, "weight": 3}, {"judge": style, "weight": 1}])
    good = comp.judge(ADD, CLEAN)
    assert good.verdict.status == "ok" and good.verdict.score == pytest.approx(0.75)
    assert good.verdict.passed == 3 and good.verdict.total == 3  # 2 tests + the constant's 1
    assert good.critique == "All 2 tests passed.\n\nSTYLE: could be nicer"
    bad = comp.judge(ADD, FAILING)
    assert bad.verdict.status == "wrong_answer" and bad.verdict.score == pytest.approx(0.0)
    assert "Wrong answer" in bad.critique and bad.critique.endswith("STYLE: could be nicer")
    many = comp.judge_many([(ADD, CLEAN), (ADD, FAILING)])
    assert [m.verdict.status for m in many] == ["ok", "wrong_answer"]
    assert [m.verdict.score for m in many] == pytest.approx([0.75, 0.0])


def test_composite_from_a_config_with_weights_list(tests_judge):
    @register("const")
    class RegConst(Const):
        pass

    comp = make_judge({"name": "composite", "judges": [tests_judge, {"name": "const", "score": 1.0}],
                       "weights": [1, 3]})
    assert isinstance(comp, CompositeJudge) and comp.weights == [1.0, 3.0]
    out = comp.judge(ADD, FAILING)
    assert out.verdict.score == pytest.approx(0.75) and out.verdict.status == "wrong_answer"


def test_composite_status_ok_only_if_all_parts_ok():
    comp = CompositeJudge([Const(1.0, "ok", "a"), Const(0.0, "wrong_answer", "b"), Const(1.0, "ok", "")])
    out = comp.judge(ADD, "x")
    assert out.verdict.status == "wrong_answer" and out.verdict.score == pytest.approx(2 / 3)
    assert out.critique == "a\n\nb"
    assert CompositeJudge([Const(1.0, "ok"), Const(0.5, "ok")]).judge(ADD, "x").verdict.status == "ok"


def test_composite_any_judge_error_is_a_judge_error():
    comp = CompositeJudge([Const(1.0, "ok"), Const(critique="part two broke", status="judge_error")])
    out = comp.judge(ADD, "x")
    assert out.verdict.status == "judge_error" and math.isnan(out.verdict.score)
    assert "part two broke" in out.verdict.details[0].error
    assert [m.verdict.status for m in comp.judge_many([(ADD, "x"), (ADD, "y")])] == ["judge_error"] * 2


def test_composite_rejects_bad_configs():
    with pytest.raises(ValueError, match="at least one"):
        CompositeJudge([])
    with pytest.raises(ValueError, match="weights"):
        CompositeJudge([Const(), Const()], weights=[-1, 2])
    with pytest.raises(ValueError, match="weights"):
        CompositeJudge([{"judge": Const(), "weight": 0}])


def test_composite_close_closes_parts():
    a, b = Const(), Const()
    CompositeJudge([a, b]).close()
    assert a.closed and b.closed


# ------------------------------------------------------------------------------------ by kind


def test_by_kind_routes_code_and_math():
    code, mathj = Const(1.0, "ok", "code judge"), Const(0.0, "wrong_answer", "math judge")
    bk = ByKindJudge({"code": code, "math": mathj})
    pairs = [(ADD, "c1"), (MATHP, "m1"), (ADD, "c2"), (MATHP, "m2")]
    seen = []
    out = bk.judge_many(pairs, progress=seen.append)
    assert [o.critique for o in out] == ["code judge", "math judge", "code judge", "math judge"]
    assert code.seen == [("add", "c1"), ("add", "c2")] and mathj.seen == [("m", "m1"), ("m", "m2")]
    assert sum(seen) == 4
    assert bk.judge(MATHP, "m3").critique == "math judge" and mathj.seen[-1] == ("m", "m3")
    other = Problem("o", "?", "proof")
    with pytest.raises(ValueError, match="proof"):
        bk.judge(other, "x")
    out = bk.judge_many([(ADD, "c"), (other, "x")])  # that sample is a judge error, not the batch's
    assert out[0].critique == "code judge" and out[1].verdict.status == "judge_error"
    assert "proof" in out[1].verdict.details[0].error
    bk.close()
    assert code.closed and mathj.closed


def test_by_kind_with_the_real_test_judge(tests_judge):
    mathj = Const(1.0, "ok", "math ok")
    out = ByKindJudge({"code": tests_judge, "math": mathj}).judge_many([(ADD, FAILING), (MATHP, "x"), (ADD, CLEAN)])
    assert [o.verdict.status for o in out] == ["wrong_answer", "ok", "ok"]
    assert out[1].critique == "math ok" and mathj.seen == [("m", "x")]


# ---------------------------------------------------------------------------- the ruff judge


def test_ruff_judge_unused_import_is_ok_but_loses_style_points(ruff_judge):
    out = ruff_judge.judge(ADD, UNUSED_IMPORT)
    assert out.verdict.status == "ok" and out.verdict.passed == 2
    assert out.verdict.score == pytest.approx(0.9) and out.verdict.score < 1
    assert "F401" in out.critique and "os" in out.critique and "All 2 tests passed." in out.critique


def test_ruff_judge_clean_solution_scores_one(ruff_judge):
    out = ruff_judge.judge(ADD, CLEAN)
    assert out.verdict.status == "ok" and out.verdict.score == 1.0 and "ruff" not in out.critique.lower()


def test_ruff_judge_failing_solution_stays_failing(ruff_judge):
    out = ruff_judge.judge(ADD, FAILING)
    assert out.verdict.status == "wrong_answer" and out.verdict.passed == 0
    assert out.verdict.score == pytest.approx(0.1)  # style only; never a pass
    bad_style_and_wrong = ruff_judge.judge(ADD, UNUSED_IMPORT.replace("a + b", "a - b"))
    assert bad_style_and_wrong.verdict.status == "wrong_answer" and bad_style_and_wrong.verdict.score == 0.0
    assert "F401" in bad_style_and_wrong.critique


def test_ruff_judge_no_code_is_a_format_error(ruff_judge):
    out = ruff_judge.judge(ADD, "I would write a function.")
    assert out.verdict.status == "format_error" and out.verdict.score == 0.0

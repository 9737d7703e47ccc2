"""The Gymnasium code environments (agentopd/envs/code.py) and the problem loaders (agentopd/envs/data.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import gymnasium as gym
import pytest
from envcheck import check_env_cleanly
from sandbox_probe import bwrap_or_skip

import agentopd.envs  # noqa: F401  (registers the environments)
from agentopd.envs import data as envdata
from agentopd.envs.code import CodeEnv, HumanEvalEnv
from agentopd.envs.data import DataError, code_problem, load_code_problems, load_humaneval
from agentopd.judges.tests import TestJudge as Judge  # (a Test* name would be collected by pytest)
from agentopd.types import Judgement, Verdict

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "sandboxfusion-samples"
MBPP = SAMPLES / "mbpp-20.jsonl"
CONTESTS = SAMPLES / "code_contests-20.jsonl"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample data not found at {SAMPLES}")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def bwrap_ok():
    bwrap_or_skip(workers=1, warm=False).close()


class _Shared:
    """The module's judge, lent to environments: their close() must not close it."""

    def __init__(self, judge):
        self._judge = judge

    def judge(self, problem, response):
        return self._judge.judge(problem, response)


@pytest.fixture(scope="module")
def judge(bwrap_ok):
    j = Judge(backend="bwrap", timeout_s=2.0)
    yield _Shared(j)
    j.close()


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


# ------------------------------------------------------------------------------- env checker


@needs_samples
@pytest.mark.parametrize("env_id, kw", [
    ("agentopd/Code-v0", {"problems": str(MBPP)}),
    ("agentopd/Code-v0", {"problems": str(CONTESTS)}),
    ("agentopd/HumanEval-v0", {}),
], ids=["mbpp", "code_contests", "humaneval"])
def test_check_env(bwrap_ok, env_id, kw):
    env = gym.make(env_id, backend="bwrap", timeout_s=2.0, **kw)
    try:
        check_env_cleanly(env)
    finally:
        env.close()


def test_make_without_problems_fails():
    with pytest.raises(ValueError, match="needs problems"):
        CodeEnv()
    with pytest.raises(ValueError, match="empty"):
        CodeEnv(problems=[], judge=object())
    with pytest.raises(ValueError, match="max_turns"):
        CodeEnv(problems=[{"prompt": "p", "tests": ["assert 1"]}], judge=object(), max_turns=0)


# ------------------------------------------------------------------------------ reset / step


@needs_samples
def test_reset_seed_determinism(judge):
    env = CodeEnv(problems=str(MBPP), judge=judge)
    ids = [env.reset(seed=s)[1]["problem_id"] for s in range(12)]
    assert ids == [env.reset(seed=s)[1]["problem_id"] for s in range(12)]
    env2 = CodeEnv(problems=str(MBPP), judge=judge)
    assert ids == [env2.reset(seed=s)[1]["problem_id"] for s in range(12)]
    assert len(set(ids)) > 1
    # seeding once fixes the whole sequence of later unseeded resets
    env.reset(seed=7)
    env2.reset(seed=7)
    assert [env.reset()[1]["problem_id"] for _ in range(8)] == [env2.reset()[1]["problem_id"] for _ in range(8)]
    # options={"index": i} picks problem i; its prompt is the observation
    obs, info = env.reset(options={"index": 3})
    assert info["problem_id"] == env.problems[3].id and obs == env.problems[3].prompt
    assert env.render() == obs


@needs_samples
def test_step_before_reset_fails(judge):
    with pytest.raises(RuntimeError, match="reset"):
        CodeEnv(problems=str(MBPP), judge=judge).step("print(1)")


@needs_samples
def test_multi_turn_critique_then_success(judge):
    env = CodeEnv(problems=str(MBPP), judge=judge, max_turns=3)
    obs, info = env.reset(options={"index": 0})
    p = env.problems[0]
    assert obs == p.prompt and "remove_Occ" in obs
    obs, reward, terminated, truncated, info = env.step(fenced("def remove_Occ(s, ch):\n    return s"))
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["turn"] == 1 and info["verdict"].status == "wrong_answer"
    assert obs == info["critique"] and "Wrong answer on test 1" in obs and "got: 'hello'" in obs
    assert env.render() == obs
    obs, reward, terminated, truncated, info = env.step(fenced(p.privileged["solution"]))
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info["turn"] == 2 and info["verdict"].status == "ok" and obs.startswith("All 3 tests passed")


@needs_samples
def test_multi_turn_partial_reward_and_turn_limit(judge):
    env = CodeEnv(problems=str(MBPP), judge=judge, max_turns=3)
    env.reset(options={"index": 0})
    sol = env.problems[0].privileged["solution"].replace("def remove_Occ(", "def _good(")
    partial = sol + "\ndef remove_Occ(s, ch):\n    return 'x' if s == 'PHP' else _good(s, ch)\n"
    results = [env.step(fenced(partial)) for _ in range(3)]
    assert [r[2] for r in results] == [False, False, True]  # terminated only at the turn limit
    assert all(r[3] is False for r in results)
    assert [r[4]["turn"] for r in results] == [1, 2, 3]
    for obs, reward, _, _, info in results:
        assert reward == pytest.approx(2 / 3) and info["verdict"].status == "wrong_answer"
        assert "Wrong answer on test 3" in obs
    # a fresh reset starts a new episode
    obs, info = env.reset(options={"index": 0})
    assert info["turn"] == 0 and obs == env.problems[0].prompt
    assert env.step(fenced("def remove_Occ(s, ch)\n  return s"))[2] is False  # syntax error, turn 1 of 3


@needs_samples
def test_single_turn_terminates_on_failure(judge):
    env = CodeEnv(problems=str(CONTESTS), judge=judge)
    env.reset(options={"index": 5})
    obs, reward, terminated, truncated, info = env.step("no code here")
    assert (reward, terminated, truncated) == (0.0, True, False)
    assert info["verdict"].status == "format_error" and "No code found" in obs


def test_judge_error_gives_nan_reward():
    class Broken:
        def judge(self, problem, response):
            return Judgement(Verdict(0.0, 0, 1, "judge_error"), "the judge failed")

    env = CodeEnv(problems=[{"prompt": "p", "tests": ["assert True"]}], judge=Broken(), max_turns=2)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step("x = 1")
    assert math.isnan(reward) and info["verdict"].status == "judge_error" and terminated is False


@needs_samples
def test_humaneval_env_whole_function_answer(judge):
    env = HumanEvalEnv(judge=judge)
    assert len(env.problems) == 164
    obs, info = env.reset(options={"index": 2})
    p = env.problems[2]
    assert info["problem_id"] == "HumanEval/2" and obs == p.prompt
    whole = p.prompt + p.privileged["solution"]
    _, reward, terminated, _, info = env.step("Here it is:\n" + fenced(whole))
    assert (reward, terminated) == (1.0, True), info["critique"]
    env.reset(options={"index": 2})
    _, reward, terminated, _, info = env.step(fenced("def truncate_number(number: float) -> float:\n    return 0.0"))
    assert reward == 0.0 and info["verdict"].status == "wrong_answer"


@needs_samples
def test_datasets_dataset_as_problem_source(judge):
    datasets = pytest.importorskip("datasets")
    rows = _rows(MBPP)[:5]
    env = CodeEnv(problems=datasets.Dataset.from_list(rows), judge=judge)
    assert [p.id for p in env.problems] == [str(r["id"]) for r in rows]
    assert env.problems[0].payload == load_code_problems(str(MBPP))[0].payload
    for i, r in enumerate(rows):
        env.reset(options={"index": i})
        _, reward, terminated, _, info = env.step(fenced(r["canonical_solution"]))
        assert (reward, terminated) == (1.0, True), info["critique"]
    # an io-style dataset (``test`` a JSON string) too
    crow = _rows(CONTESTS)[0]
    (p,) = CodeEnv(problems=datasets.Dataset.from_list([crow]), judge=judge).problems
    assert p.payload["style"] == "io" and len(p.payload["tests"]) == len(json.loads(crow["test"]))


# ----------------------------------------------------------------------------------- loaders


def test_humaneval_loads_164():
    ps = load_humaneval()
    assert len(ps) == 164 and [p.id for p in ps] == [f"HumanEval/{i}" for i in range(164)]
    for p in ps:
        assert p.kind == "code" and p.payload["style"] == "call" and p.payload["prefix"] == p.prompt
        assert p.payload["tests"][0].rstrip().endswith(f"check({p.payload['entry_point']})")
        assert p.privileged["solution"]
    assert [p.id for p in load_code_problems("humaneval")] == [p.id for p in ps]
    assert len(load_code_problems("HumanEval")) == 164


def test_humaneval_sha_mismatch_raises(monkeypatch):
    monkeypatch.setattr(envdata, "HUMANEVAL_SHA256", "0" * 64)
    with pytest.raises(DataError, match="sha256"):
        load_humaneval()
    with pytest.raises(DataError, match="sha256"):
        load_code_problems("humaneval")
    assert len(load_humaneval(check_sha=False)) == 164


@needs_samples
def test_sample_files_load():
    mbpp = load_code_problems(str(MBPP))
    assert len(mbpp) == 20 and all(p.payload["style"] == "call" for p in mbpp)
    assert mbpp[0].id == "11" and mbpp[0].payload["tests"][0].startswith("assert remove_Occ(")
    assert all(p.privileged["solution"] for p in mbpp)
    cc = load_code_problems(str(CONTESTS))
    assert len(cc) == 20 and all(p.payload["style"] == "io" for p in cc)
    raw = json.loads(_rows(CONTESTS)[0]["test"])
    assert cc[0].payload["tests"][0] == {"input": raw[0]["input"]["stdin"], "output": raw[0]["output"]["stdout"]}
    assert all(isinstance(t["input"], str) and isinstance(t["output"], str) for p in cc for t in p.payload["tests"])


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = json.dumps({"id": "a", "prompt": "p", "tests": ["assert True"]})


def test_bad_json_line_names_file_and_line(tmp_path):
    f = _write(tmp_path / "probs.jsonl", [GOOD, GOOD, '{"id": "c", "prompt": ', GOOD])
    with pytest.raises(DataError) as e:
        load_code_problems(f)
    assert f"{f}:3:" in str(e.value) and "not valid JSON" in str(e.value)


def test_blank_lines_count_towards_line_numbers(tmp_path):
    f = _write(tmp_path / "probs.jsonl", [GOOD, "", "  ", "[1, 2]"])
    with pytest.raises(DataError, match=rf"{f}:4: expected a JSON object"):
        load_code_problems(f)
    again = GOOD.replace('"id": "a"', '"id": "a2"')  # (a repeated id is an error of its own)
    assert len(load_code_problems(_write(tmp_path / "ok.jsonl", [GOOD, "", again]))) == 2


@pytest.mark.parametrize("row, what", [
    ({"id": "b", "prompt": "p"}, "no tests"),
    ({"id": "b", "prompt": "p", "tests": []}, "no tests"),
    ({"id": "b", "tests": ["assert True"]}, "no 'prompt'"),
    ({"id": "b", "prompt": "p", "tests": [{"input": "1"}]}, "'input' and 'output'"),
    ({"id": "b", "prompt": "p", "test": "[not json"}, "not JSON"),
    ({"task_id": 1, "test_list": ["assert True"]}, "MBPP row without"),
])
def test_malformed_row_names_file_and_line(tmp_path, row, what):
    f = _write(tmp_path / "probs.jsonl", [GOOD, GOOD, json.dumps(row)])
    with pytest.raises(DataError) as e:
        load_code_problems(f)
    assert str(e.value).startswith(f"{f}:3: ") and what in str(e.value)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_code_problems(str(tmp_path / "nope.jsonl"))


def test_row_shapes():
    he = code_problem({"task_id": "T/1", "prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n",
                       "entry_point": "f", "canonical_solution": "    return 1\n"})
    assert he.id == "T/1" and he.payload["tests"] == ["def check(c):\n    assert c() == 1\n\ncheck(f)\n"]
    apps = code_problem({"question": "q", "input_output": json.dumps({"inputs": ["1\n"], "outputs": ["2\n"]})})
    assert apps.payload == {"style": "io", "tests": [{"input": "1\n", "output": "2\n"}]}
    native = code_problem({"id": 7, "prompt": "p", "tests": ["assert f() == 1"], "prefix": "def f():\n"})
    assert native.id == "7" and native.payload["prefix"] == "def f():\n" and native.payload["style"] == "call"

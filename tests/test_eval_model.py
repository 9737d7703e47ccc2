"""``agentopd eval model`` (agentopd/evaluate.py) end to end through the CLI, with the openai engine
against a loopback server and real sandboxes: pass@k by the unbiased estimator, human-eval
compatible results that ``eval passk`` re-judges to the same numbers, resume without re-querying
the server, the completion format on HumanEval, and one-line errors. Also the hf engine on the
tiny model in process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from openai_server import messages_text
from sandbox_probe import bwrap_or_skip

from agentopd.eval.passk import pass_at_k

pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[1]

ADD = {"id": "add", "prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]}
MUL = {"id": "mul", "prompt": "Write mul(a, b).", "tests": ["assert mul(2, 3) == 6", "assert mul(0, 5) == 0"]}


def fenced(code: str) -> str:
    return f"Here it is:\n```python\n{code}```\n"


ANSWERS = {  # per problem, one answer per sample: add 2 of 3 right, mul 1 of 3
    "add": [fenced("def add(a, b):\n    return a + b\n"), fenced("def add(a, b):\n    return a * b\n"),
            fenced("def add(a, b):\n    return b + a\n")],
    "mul": [fenced("def mul(a, b):\n    return a + b\n"), "no code at all", fenced("def mul(a, b):\n    return a * b\n")],
}


def answer(body, i):
    """The first ``n`` answers of the problem the request is about, or the last ``n`` (a resumed
    run asks only for the missing ones, which are the last)."""
    key = "add" if "add(a, b)" in messages_text(body) else "mul"
    return ANSWERS[key][-body["n"]:]


@pytest.fixture(scope="module", autouse=True)
def bwrap_ok():
    bwrap_or_skip(workers=1, warm=False).close()


def write_config(tmp_path, server, **sections) -> Path:
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps(ADD) + "\n" + json.dumps(MUL) + "\n")
    cfg = {"model": {"path": "fake"}, "engine": {"name": "openai", "base_url": server.url, "timeout_s": 5},
           "env": {"id": "agentopd/Code-v0", "kwargs": {"problems": str(problems), "backend": "bwrap"}},
           "sampling": {"temperature": 0.8, "max_new_tokens": 128},
           "eval": {"samples": 3, "k": [1, 2, 3]}, "run": {"out": str(tmp_path / "out"), "progress": False, "resume": True}}
    for name, values in sections.items():
        cfg[name].update(values)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "NO_PROXY": "127.0.0.1,localhost"}
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "agentopd.cli", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def expected(k: int) -> float:
    return (pass_at_k(3, 2, k) + pass_at_k(3, 1, k)) / 2


def first_run(tmp_path, serve):
    """The scripted server, the config and the result of a first ``eval model`` run."""
    s = serve(answer)
    cfg = write_config(tmp_path, s)
    r = cli("eval", "model", "--config", cfg)
    assert r.returncode == 0, r.stderr
    return s, cfg, r


def test_eval_model_end_to_end_then_resume(tmp_path, serve):
    s, cfg, r = first_run(tmp_path, serve)
    report = json.loads(r.stdout)
    for k in (1, 2, 3):
        assert report[f"pass@{k}"] == pytest.approx(expected(k))
    assert report["problems"] == 2 and report["samples"] == 6 and report["judge_errors"] == 0
    assert len(s.requests) == 2 and all(q["body"]["n"] == 3 for q in s.requests)  # n samples per request
    assert "| pass@1 | 0.5000 |" in r.stderr
    out = tmp_path / "out"
    assert json.loads((out / "summary.json").read_text()) == report
    assert (out / "summary.md").read_text().startswith("| metric | value |")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(x["task_id"], x["sample_index"], x["passed"]) for x in rows] == [
        ("add", 0, True), ("add", 1, False), ("add", 2, True), ("mul", 0, False), ("mul", 1, False), ("mul", 2, True)]
    assert rows[0]["completion"] == "def add(a, b):\n    return a + b\n" and rows[0]["result"] == "passed"
    assert rows[0]["response"] == ANSWERS["add"][0]
    assert rows[1]["result"].startswith("failed") and rows[4]["completion"] == ""

    # human-eval compatible: `eval passk` on the results file gives the same pass@k
    r2 = cli("eval", "passk", "--dataset", tmp_path / "problems.jsonl", "--samples", out / "results.jsonl",
             "--k", "1,2,3", "--quiet", "--backend", "bwrap")
    assert r2.returncode == 0, r2.stderr
    again = json.loads(r2.stdout)
    assert [again[f"pass@{k}"] for k in (1, 2, 3)] == [report[f"pass@{k}"] for k in (1, 2, 3)]

    # resume: nothing left to do, the server is not asked again
    r = cli("eval", "model", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert len(s.requests) == 2 and json.loads(r.stdout) == report

    # a run cut short: only the missing samples are asked for, as one request for mul's two
    kept = [line for line in (out / "results.jsonl").read_text().splitlines()
            if not ('"mul"' in line and '"sample_index": 0' not in line)]
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    r = cli("eval", "model", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert len(s.requests) == 3 and s.requests[-1]["body"]["n"] == 2
    assert "mul" in messages_text(s.requests[-1]["body"])
    assert json.loads(r.stdout) == report  # the same answers, judged the same

    # more samples later: only the new ones
    r = cli("eval", "model", "--config", cfg, "eval.samples=4", "eval.k=[1,4]")
    assert r.returncode == 0, r.stderr
    assert [q["body"]["n"] for q in s.requests[3:]] == [1, 1] and json.loads(r.stdout)["samples"] == 8

    # another model (or data, or sampling) is not mixed into these results
    r = cli("eval", "model", "--config", cfg, "model.path=other", "sampling.temperature=0.2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "another run (model.path: 'fake' -> 'other')" in r.stderr and "run.resume=false" in r.stderr
    assert len(s.requests) == 5

    # resume off: everything again
    r = cli("eval", "model", "--config", cfg, "run.resume=false")
    assert r.returncode == 0, r.stderr
    assert len(s.requests) == 7 and json.loads(r.stdout)["pass@1"] == pytest.approx(expected(1))


def test_completion_format_on_humaneval(tmp_path, serve):
    from agentopd.envs.data import load_humaneval

    he = load_humaneval()[:3]
    solutions = {p.prompt: p.privileged["solution"][len(p.prompt):] for p in he}  # the canonical completion
    # this server ignores stop strings: the text is cut at the first one by the evaluator
    s = serve(lambda body, i: solutions[body["prompt"]] + "\ndef unrelated(:\n")
    cfg = write_config(tmp_path, s, engine={"endpoint": "completions"},
                       env={"id": "agentopd/HumanEval-v0", "kwargs": {"backend": "bwrap"}},
                       sampling={"stop": ["\ndef "]}, eval={"k": [1, 2], "samples": 2, "problems": 3, "format": "completion"})
    r = cli("eval", "model", "--config", cfg)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["pass@1"] == 1.0 and report["pass@2"] == 1.0 and report["problems"] == 3
    assert [q["path"] for q in s.requests] == ["/v1/completions"] * 3
    assert all(q["body"]["stop"] == ["\ndef "] for q in s.requests)
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [x["completion"] for x in rows] == [solutions[p.prompt] for p in he for _ in range(2)]


def test_errors_are_one_line(tmp_path, serve):
    s = serve(["x"])
    cfg = write_config(tmp_path, s)
    for over, words in ((["engine.name=bogus"], ["engine.name", "'hf', 'vllm' or 'openai'"]),
                        (["eval.format=completion"], ["engine.endpoint: completions"]),
                        (["engine.endpiont=x"], ["did you mean 'engine.endpoint'"]),
                        (["env.kwargs.problems=/nonexistent.jsonl"], ["/nonexistent.jsonl"])):
        r = cli("eval", "model", "--config", cfg, *over)
        assert r.returncode == 2 and r.stdout == "", (over, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        for w in words:
            assert w in r.stderr, (w, r.stderr)
    assert s.requests == []


def test_server_down_is_one_line(tmp_path, serve):
    s = serve(["x"])
    cfg = write_config(tmp_path, s, engine={"base_url": "http://127.0.0.1:9/v1", "max_retries": 1})
    r = cli("eval", "model", "--config", cfg)
    assert r.returncode == 2 and "no answer after 2 attempts" in r.stderr and "Traceback" not in r.stderr


def test_missing_vllm_names_the_extra(tmp_path, serve):
    fake = tmp_path / "fake_site"
    fake.mkdir()
    (fake / "vllm.py").write_text("raise ImportError('no vllm here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")]))}
    cfg = write_config(tmp_path, serve(["x"]))
    r = cli("eval", "model", "--config", cfg, "engine.name=vllm", "model.path=some/model", env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "agentopd: error: the vllm engine needs vLLM: pip install 'agentopd[vllm]'"


def test_eval_model_with_the_hf_engine_in_process(tmp_path):
    from agentopd.config import build
    from agentopd.eval.model import eval_model

    cfg = build({"model": {"path": "tiny"}, "engine": {"name": "hf"}, "run": {"device": "cpu", "out": str(tmp_path / "hf"),
                 "progress": False}, "env": {"id": "agentopd/Math-v0", "kwargs": {"problems": "arithmetic", "n": 2, "levels": [1]}},
                 "sampling": {"max_new_tokens": 8}, "eval": {"samples": 2, "k": [1, 2]}})
    report = eval_model(cfg)
    assert report["problems"] == 2 and report["samples"] == 4 and {"pass@1", "pass@2"} <= set(report)
    rows = [json.loads(line) for line in (tmp_path / "hf" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["completion"] == r["response"] for r in rows)  # math: the whole answer


def test_judge_failures_are_redone_on_resume(tmp_path, serve):
    from agentopd.judges.base import judge_error

    from agentopd.config import build
    from agentopd.eval.model import eval_model
    from agentopd.types import Judgement, Verdict

    class FlakyJudge:  # fails on mul the first time it sees it
        def __init__(self):
            self.seen = set()

        def judge_many(self, pairs, progress=None):
            out = []
            for p, _ in pairs:
                flaky = p.id == "mul" and p.id not in self.seen
                out.append(judge_error("sandbox down") if flaky else Judgement(Verdict(1.0, 1, 1, "ok")))
            self.seen |= {p.id for p, _ in pairs}
            return out

    s = serve(answer)
    cfg = build(yaml.safe_load(write_config(tmp_path, s).read_text()))
    judge = FlakyJudge()
    first = eval_model(cfg, judge=judge)
    assert first["judge_errors"] == 3 and first["samples"] == 3 and first["pass@1"] == 1.0
    again = eval_model(cfg, judge=judge)
    assert again["judge_errors"] == 0 and again["samples"] == 6
    assert len(s.requests) == 3 and "mul" in messages_text(s.requests[-1]["body"])


@pytest.mark.parametrize("override, words", [
    ("eval.chunk=0", ["eval.chunk", ">= 1"]), ("eval.problems=-3", ["eval.problems", ">= 0"]),
    ("eval.samples=0", ["eval.samples", ">= 1"]), ("eval.k=[-1]", ["eval.k"]),
    ("engine.concurrency=0", ["engine.concurrency", ">= 1"]),
])
def test_options_out_of_range_are_one_line_before_any_request(tmp_path, serve, override, words):
    s = serve(["x"])
    r = cli("eval", "model", "--config", write_config(tmp_path, s), override)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(w in r.stderr for w in words) and "Traceback" not in r.stderr, r.stderr
    assert s.requests == []


def test_a_torn_last_line_is_dropped_and_redone(tmp_path, serve):
    s, cfg, r = first_run(tmp_path, serve)
    report = json.loads(r.stdout)
    results = tmp_path / "out" / "results.jsonl"
    text = results.read_text()
    lines = text.rstrip("\n").splitlines()
    results.write_text("".join(x + "\n" for x in lines[:-1]) + lines[-1][:25])  # killed while writing the last
    r = cli("eval", "model", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert "last line is incomplete" in r.stderr and "Traceback" not in r.stderr
    assert len(s.requests) == 3 and s.requests[-1]["body"]["n"] == 1  # only the torn sample again
    assert json.loads(r.stdout) == report
    assert len(results.read_text().splitlines()) == 6


# ------------------------------------------------------------------ resume is exact


def _hf_config(out, chunk: int):
    from agentopd.config import build

    return build({"model": {"path": "tiny"}, "engine": {"name": "hf", "batch_size": 4},
                  "env": {"id": "agentopd/Math-v0", "kwargs": {"problems": "arithmetic", "n": 5, "levels": [1]}},
                  "sampling": {"max_new_tokens": 12, "temperature": 1.0}, "eval": {"samples": 3, "k": [1, 2, 3],
                  "chunk": chunk}, "run": {"seed": 7, "device": "cpu", "out": str(out), "progress": False,
                  "resume": True}})


def test_a_resumed_eval_equals_an_uninterrupted_one(tmp_path):
    """Samples are a function of (seed, problem, sample index) alone: a run stopped after its first
    chunk (chunk 1) and resumed with another chunk size, and one whose results lost single samples,
    give the same completions and pass@k as one uninterrupted run (chunk 5)."""
    from seeded_runs import Interrupted, StopOnCall, TextJudge, rows_by_key

    from agentopd.eval.model import build_engine, eval_model

    engine = build_engine(_hf_config(tmp_path, 1))
    whole = eval_model(_hf_config(tmp_path / "whole", 5), engine=engine, judge=TextJudge())
    want = rows_by_key(whole["results"])
    assert 0 < whole["pass@1"] < 1 and len({r["completion"] for r in want.values()}) > 5
    with pytest.raises(Interrupted):
        eval_model(_hf_config(tmp_path / "cut", 1), engine=StopOnCall(engine, 2), judge=TextJudge())
    assert len(rows_by_key(tmp_path / "cut" / "results.jsonl")) == 3  # the first chunk only
    again = eval_model(_hf_config(tmp_path / "cut", 2), engine=engine, judge=TextJudge())
    assert rows_by_key(again["results"]) == want
    assert {k: again[k] for k in ("pass@1", "pass@2", "pass@3")} == {k: whole[k] for k in ("pass@1", "pass@2", "pass@3")}
    results = tmp_path / "cut" / "results.jsonl"  # single samples lost: redone alone, the same draws
    lines = results.read_text().splitlines()
    results.write_text("".join(x + "\n" for i, x in enumerate(lines) if i not in (1, 5, 6, 13)))
    eval_model(_hf_config(tmp_path / "cut", 3), engine=engine, judge=TextJudge())
    assert rows_by_key(results) == want


def test_an_engine_without_per_sample_seeds_is_warned_about(tmp_path):
    """A user's engine whose ``generate`` takes no ``seeds``: the run goes on with one seed per call,
    and a warning says a resumed run may differ."""
    from seeded_runs import TextJudge

    from agentopd.eval.model import build_engine, eval_model

    hf = build_engine(_hf_config(tmp_path, 1))

    class OldEngine:
        tokenizer = hf.tokenizer

        def generate(self, prompt_ids, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop=None, seed=None):
            return hf.generate(prompt_ids, n, max_new_tokens, temperature, top_p, stop, seed)

    with pytest.warns(UserWarning, match="takes no per-sample seeds"):
        report = eval_model(_hf_config(tmp_path / "old", 5), engine=OldEngine(), judge=TextJudge())
    assert report["samples"] == 15

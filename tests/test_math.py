"""The math judge (agentopd/judges/math.py: answer extraction, math-verify in worker processes with a hard
deadline), the math environment (agentopd/envs/math.py), the procedural generator (agentopd/envs/procedural.py),
reasoning-gym problems, and ``agentopd eval passk`` on a math file."""
from __future__ import annotations

import ast
import hashlib
import json
import math
import operator
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import gymnasium as gym
import pytest
from envcheck import check_env_cleanly

import agentopd.envs  # noqa: F401  (registers the environments)
from agentopd.envs.data import DataError, load_math_problems, load_problems
from agentopd.envs.math import MathEnv
from agentopd.envs.procedural import arithmetic_problems
from agentopd.judges.math import MathJudge, extract_answer
from agentopd.types import Problem

TIMEOUT_S = 4.0


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def judge():
    """The module's one MathJudge (one pool of math-verify workers)."""
    j = MathJudge(timeout_s=TIMEOUT_S, workers=2)
    yield j
    j.close()


@pytest.fixture(scope="module")
def reveal_judge(judge):
    """A judge that states the expected answer, on the module judge's worker pool."""
    j = MathJudge(reveal_answer=True, timeout_s=TIMEOUT_S, workers=2)
    j.verifier.close()
    j.verifier = judge.verifier
    return j


class _Shared:
    """The module's judge, lent to environments: their close() must not close it."""

    def __init__(self, judge):
        self._judge = judge

    def judge(self, problem, response):
        return self._judge.judge(problem, response)

    def __deepcopy__(self, memo):  # gymnasium deep-copies make() kwargs (check_env re-makes the env)
        return self


def mp(answer: str, pid: str = "p") -> Problem:
    return Problem(pid, "Solve it.", "math", {"answer": answer})


def boxed(ans: str) -> str:
    return f"Let me think step by step.\nSo the result is \\boxed{{{ans}}}."


# ----------------------------------------------------------------------- equivalence pairs

# (gold, predicted, equivalent?) -- each pair checked against what math-verify decides
EQUIV = [
    ("1/2", "0.5", True),
    ("\\frac{1}{2}", "0.5", True),
    ("0.75", "3/4", True),
    ("\\dfrac{3}{4}", "\\frac{6}{8}", True),
    ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("[0,1)", "[0,1)", True),
    ("(-\\infty, 0)", "(-\\infty,0)", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2-1", "(x-1)(x+1)", True),
    ("1", "\\sin^2 x + \\cos^2 x", True),
    ("2\\pi", "\\pi \\cdot 2", True),
    ("50\\%", "50\\%", True),
    ("50\\%", "0.5", True),
    ("-3", "-3", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("123456789012345678901234567890", "123456789012345678901234567890", True),
    ("3", "x=3", True),
    ("1024", "2^{10}", True),
    ("1000", "1{,}000", True),
    ("10", "10.0", True),
    ("-4/45", "-\\frac{4}{45}", True),
    # wrong answers of each kind
    ("1/2", "0.49", False),
    ("1/2", "1/3", False),
    ("\\sqrt{8}", "3\\sqrt{2}", False),
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{2}/2", False),
    ("\\{1,2\\}", "\\{1,3\\}", False),
    ("\\{1,2\\}", "\\{1,2,3\\}", False),
    ("[0,1)", "(0,1]", False),
    ("[0,1)", "[0,1]", False),
    ("(1,2)", "(2,1)", False),
    ("x^2+2x+1", "(x-1)^2", False),
    ("-3", "3", False),
    ("-\\frac{1}{2}", "0.5", False),
    ("123456789012345678901234567890", "123456789012345678901234567891", False),
    ("3", "x = 4", False),
    ("\\pi", "3.14159", False),
    ("35/18", "36/18", False),
]


@pytest.mark.parametrize("gold, pred, same", EQUIV, ids=[f"{g}|{p}" for g, p, _ in EQUIV])
def test_equivalence(judge, gold, pred, same):
    j = judge.judge(mp(gold), boxed(pred))
    v = j.verdict
    assert v.status == ("ok" if same else "wrong_answer"), (v, j.critique)
    assert v.score == (1.0 if same else 0.0) and v.passed == int(same) and v.total == 1
    assert (pred in j.critique) and (("Correct" in j.critique) == same)


def test_minerva_final_answer_line(judge):
    text = "Final Answer: The final answer is $3$. I hope it is correct."
    assert judge.judge(mp("3"), text).verdict.status == "ok"
    assert judge.judge(mp("4"), text).verdict.status == "wrong_answer"


# ------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize("text, answer", [
    ("first \\boxed{1}, on reflection \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, \\{2\\}\\}}", "\\{1, \\{2\\}\\}"),
    ("so \\fbox{7}", "7"),
    ("\\boxed 5 and later \\boxed 6", "6"),
    ("\\boxed{3} then \\boxed 5", "5"),
    ("\\boxed 5 then \\boxed{3}", "3"),
    ("unclosed \\boxed{2} then \\boxed{\\frac{1}{2}", "2"),
    ("Working...\nThe answer is 7.", "7"),
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("answer: 3.5.", "3.5"),
    ("The answer is 1.\nNo wait, the answer is 2.", "2"),
    ("\\boxed{9}\nThe answer is 7.", "9"),
    ("I give up.", None),
    ("", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extract_answer_custom_pattern():
    text = "18 - 6 = 12\n#### 12"
    assert extract_answer(text) is None
    assert extract_answer(text, pattern=r"####\s*(\S+)") == "12"
    assert extract_answer("The answer is 7.", pattern=None) is None
    assert extract_answer("\\boxed{4}\n#### 12", pattern=r"####\s*(\S+)") == "4"  # boxed still first


def test_custom_pattern_in_the_judge(judge):
    j = MathJudge(pattern=r"####\s*(\S+)", timeout_s=TIMEOUT_S)
    j.verifier.close()
    j.verifier = judge.verifier
    assert j.judge(mp("12"), "18 - 6 = 12\n#### 12").verdict.status == "ok"
    assert j.judge(mp("12"), "The answer is 12.").verdict.status == "format_error"


@pytest.mark.parametrize("response", ["I think it is probably large.", "", "\\boxed{}"])
def test_no_answer_is_a_format_error_asking_for_boxed(judge, response):
    j = judge.judge(mp("42"), response)
    assert j.verdict.status == "format_error" and j.verdict.score == 0.0 and j.verdict.passed == 0
    assert "\\boxed" in j.critique and "42" not in j.critique


def test_reveal_answer_controls_the_critique(judge, reveal_judge):
    p = mp("\\frac{7}{13}")
    hidden = judge.judge(p, boxed("0.5"))
    shown = reveal_judge.judge(p, boxed("0.5"))
    assert hidden.verdict.status == shown.verdict.status == "wrong_answer"
    assert "\\frac{7}{13}" not in hidden.critique and "7" not in hidden.critique and "13" not in hidden.critique
    assert "0.5" in hidden.critique
    assert "\\frac{7}{13}" in shown.critique and "0.5" in shown.critique
    # a correct answer needs no reveal either way
    assert reveal_judge.judge(p, boxed("7/13")).verdict.status == "ok"


# ------------------------------------------------------------------- bounded time, threads


def test_pathological_expression_is_a_judge_error_in_bounded_time(judge):
    t0 = time.monotonic()
    j = judge.judge(mp("3"), boxed("2^{2^{2^{2^{2^{10}}}}}"))
    elapsed = time.monotonic() - t0
    assert j.verdict.status == "judge_error" and math.isnan(j.verdict.score)
    assert f"more than {TIMEOUT_S:g} s of CPU time" in j.verdict.details[0].error
    from agentopd.sandbox.workers import wall_limit

    assert elapsed < wall_limit(TIMEOUT_S) + 5, f"took {elapsed:.1f} s"  # CPU time, or at worst the backstop
    # the worker that was stuck is dead, not left burning a CPU
    dead = [w for w in judge.verifier.pool.live.values() if not w.alive()]
    assert dead
    # the same pool still judges correctly afterwards (more calls than slots: every slot is used)
    for _ in range(2):
        assert judge.judge(mp("1/2"), boxed("0.5")).verdict.status == "ok"
        assert judge.judge(mp("1/2"), boxed("0.6")).verdict.status == "wrong_answer"
    assert all(w.alive() for w in judge.verifier.pool.live.values())
    for w in dead:
        assert w.proc.poll() is not None


def test_verification_from_many_threads(judge):
    cases = [(g, p, s) for g, p, s in EQUIV[::2]] * 2
    with ThreadPoolExecutor(max_workers=8) as ex:
        got = list(ex.map(lambda c: judge.judge(mp(c[0]), boxed(c[1])).verdict.status, cases))
    assert got == ["ok" if s else "wrong_answer" for _, _, s in cases]


def test_judge_many_keeps_order(judge):
    pairs = [(mp(str(i), f"p{i}"), boxed(str(i if i % 3 else i + 1))) for i in range(12)]
    seen = []
    out = judge.judge_many(pairs, progress=seen.append)
    assert [j.verdict.status for j in out] == ["wrong_answer" if i % 3 == 0 else "ok" for i in range(12)]
    assert sum(seen) == 12


# ------------------------------------------------------------------------ the environment


_check = check_env_cleanly


def test_check_env_generated(judge):
    env = gym.make("agentopd/Math-v0", n=20, judge=_Shared(judge))
    try:
        obs, info = _check(env)
        p = env.unwrapped.problem
        assert obs == p.prompt and "\\boxed" in obs
        _, reward, terminated, truncated, info = env.step(boxed(p.payload["answer"]))
        assert reward == 1.0 and terminated and not truncated and info["verdict"].status == "ok"
    finally:
        env.close()


@pytest.fixture
def custom_rows():
    return [{"id": "q1", "q": "What is 1/2 + 1/4?", "a": "3/4"},
            {"id": "q2", "q": "What is 6 * 7?", "a": 42},
            {"id": "q3", "q": "Simplify sqrt(8).", "a": "2\\sqrt{2}"}]


def test_check_env_jsonl_custom_columns(judge, tmp_path, custom_rows):
    f = tmp_path / "math.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in custom_rows))
    env = gym.make("agentopd/Math-v0", problems=str(f), question_key="q", answer_key="a", judge=_Shared(judge))
    try:
        _check(env)
        probs = env.unwrapped.problems
        assert [p.id for p in probs] == ["q1", "q2", "q3"]
        assert [p.payload["answer"] for p in probs] == ["3/4", "42", "2\\sqrt{2}"]
        assert all(p.kind == "math" for p in probs)
        obs, _ = env.reset(options={"index": 2})
        assert obs == "Simplify sqrt(8)."
        _, reward, terminated, _, _ = env.step(boxed("\\sqrt{8}"))
        assert reward == 1.0 and terminated
    finally:
        env.close()


def test_check_env_datasets_dataset(judge, custom_rows):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{**r, "a": str(r["a"])} for r in custom_rows])
    env = gym.make("agentopd/Math-v0", problems=ds, question_key="q", answer_key="a", judge=_Shared(judge))
    try:
        _check(env)
        assert len(env.unwrapped.problems) == 3
        env.reset(options={"index": 1})
        _, reward, _, _, info = env.step(boxed("41"))
        assert reward == 0.0 and info["verdict"].status == "wrong_answer"
    finally:
        env.close()


def test_multi_turn_critique_is_the_next_observation(judge):
    env = MathEnv(problems=[{"question": "What is 6 * 7?", "answer": "42"}], max_turns=3, judge=_Shared(judge))
    try:
        obs, _ = env.reset(seed=1)
        assert obs == "What is 6 * 7?"
        obs, reward, terminated, truncated, info = env.step("no idea")
        assert info["verdict"].status == "format_error" and reward == 0.0 and not terminated and not truncated
        assert "\\boxed" in obs and obs == info["critique"] == env.render()
        obs, reward, terminated, _, info = env.step(boxed("41"))
        assert reward == 0.0 and not terminated and "41" in obs and "incorrect" in obs and "42" not in obs
        obs, reward, terminated, _, info = env.step(boxed("42"))
        assert reward == 1.0 and terminated and info["turn"] == 3 and info["verdict"].status == "ok"
    finally:
        env.close()


def test_multi_turn_turn_limit(judge):
    env = MathEnv(problems=[{"question": "1+1?", "answer": "2"}], max_turns=2, judge=_Shared(judge))
    env.reset(seed=0)
    assert env.step(boxed("3"))[2] is False
    _, reward, terminated, _, info = env.step(boxed("4"))
    assert terminated and reward == 0.0 and info["verdict"].status == "wrong_answer"


def test_env_judge_error_reward_is_nan(judge):
    bad = Problem("x", "q", "math", {"answer": "1", "scorer": lambda a: 1 / 0})
    env = MathEnv(problems=[bad], judge=_Shared(judge), max_turns=3)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(boxed("1"))
    assert math.isnan(reward) and info["verdict"].status == "judge_error" and not terminated


def test_malformed_math_row_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "1+1?", "answer": "2"}\n\n{"question": "2+2?"}\n')
    with pytest.raises(DataError, match=re.escape(f"{f}:3") + ".*answer"):
        load_math_problems(str(f))
    with pytest.raises(DataError, match=re.escape(f"{f}:3")):
        MathEnv(problems=str(f), judge=object())
    f.write_text('{"question": "1+1?", "answer": ""}\n')
    with pytest.raises(DataError, match=re.escape(f"{f}:1") + ".*answer"):
        load_math_problems(str(f))
    f.write_text('{"q": "1+1?", "answer": "2"}\n')
    with pytest.raises(DataError, match=re.escape(f"{f}:1") + ".*question"):
        load_math_problems(str(f))


# --------------------------------------------------------------------- procedural problems

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _calc(expr: str):
    """Evaluate +, -, *, / and brackets over integers exactly (Fractions), independently of the
    generator."""

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return Fraction(n.value)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](ev(n.left), ev(n.right))
        raise ValueError(f"unexpected {ast.dump(n)}")

    return ev(ast.parse(expr, mode="eval"))


def _recompute(p: Problem) -> Fraction:
    level = p.payload["level"]
    if level == 4:
        m = re.fullmatch(r"Solve for x: (\d+)x ([+-]) (\d+) = (-?\d+)\. .*", p.prompt)
        assert m, p.prompt
        a, sign, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        b = b if sign == "+" else -b
        return Fraction(c - b, a)
    m = re.fullmatch(r"Compute (.+)\. Put the final answer in \\boxed\{\}\.", p.prompt)
    assert m, p.prompt
    expr = m[1]
    shape = {1: r"\d\d [+-] \d\d", 2: r"\d\d \* \d{1,2}", 3: r"\(\d\d [+*-] \d\d\) [+-] \d\d",
             5: r"\d/\d [+-] \d/\d"}[level]
    assert re.fullmatch(shape, expr), (level, expr)
    return _calc(expr)


def test_generator_is_deterministic_per_seed():
    a, b, c = arithmetic_problems(50, seed=7), arithmetic_problems(50, seed=7), arithmetic_problems(50, seed=8)
    key = [(p.id, p.prompt, p.payload["answer"]) for p in a]
    assert key == [(p.id, p.prompt, p.payload["answer"]) for p in b]
    assert [p.prompt for p in a] != [p.prompt for p in c]
    assert len({p.id for p in a + c}) == 100


def test_generator_levels_and_answers_are_correct():
    probs = arithmetic_problems(500, seed=3)
    assert [p.payload["level"] for p in probs[:10]] == [1, 2, 3, 4, 5] * 2
    for p in probs:
        assert p.kind == "math" and p.prompt.endswith("Put the final answer in \\boxed{}.")
        ans, want = p.payload["answer"], _recompute(p)
        assert Fraction(ans) == want, (p.prompt, ans, want)
        if p.payload["level"] == 4:
            assert want.denominator == 1
        if p.payload["level"] == 5:
            assert ans == str(want)  # reduced p/q, or a plain integer
        else:
            assert re.fullmatch(r"-?\d+", ans), ans
    only2 = arithmetic_problems(20, levels=(2,), seed=0)
    assert {p.payload["level"] for p in only2} == {2}
    with pytest.raises(ValueError, match="levels"):
        arithmetic_problems(5, levels=(6,))


def test_math_judge_accepts_generated_answers(judge):
    probs = arithmetic_problems(15, seed=11)
    out = judge.judge_many([(p, boxed(p.payload["answer"])) for p in probs])
    assert [j.verdict.status for j in out] == ["ok"] * 15
    wrong = [(p, boxed(str(Fraction(p.payload["answer"]) + 1))) for p in probs[:5]]
    assert [j.verdict.status for j in judge.judge_many(wrong)] == ["wrong_answer"] * 5


def _families():
    from agentopd.envs.procedural import micro_problems

    return {**{f"arithmetic-{lv}": arithmetic_problems(6, levels=(lv,), seed=5) for lv in (1, 2, 3, 4, 5)},
            **{f"micro-{lv}": micro_problems(6, levels=(lv,), seed=5) for lv in (1, 2, 3)}}


def _unevaluated(p) -> str:
    """An expression equal to the answer that is not a number: the question's own expression
    where there is one, else (solve for x) the value written as a sum."""
    expr = p.payload.get("expression")
    return f"0 + ({expr})" if expr else f"{p.payload['answer']} + 0"


@pytest.mark.parametrize("family", sorted(_families()))
def test_echoed_and_unevaluated_answers_fail_on_every_generated_family(judge, family):
    probs = _families()[family]
    assert all(p.payload["answer_format"] == "number" for p in probs)
    echoes = [(p, r) for p in probs if p.payload.get("expression")
              for r in (boxed(p.payload["expression"]), f"The answer is {p.payload['expression']}")]
    if not family.startswith("arithmetic-4"):
        assert len(echoes) == 2 * len(probs)
    unevaluated = [(p, boxed(_unevaluated(p))) for p in probs]
    for j in judge.judge_many(echoes + unevaluated):
        assert j.verdict.status == "wrong_answer" and j.verdict.score == 0.0, j.critique
        assert "restates the question" in j.critique or "A number was asked for" in j.critique
    assert any("A number was asked for" in j.critique for j in judge.judge_many(unevaluated))
    right = judge.judge_many([(p, boxed(p.payload["answer"])) for p in probs])
    assert [j.verdict.status for j in right] == ["ok"] * len(probs)


def test_form_rules_only_where_asked(judge, tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"id": "n", "question": "Compute 3/4 + 1/4.", "answer": "1", "answer_format": "number",
                             "expression": "3/4 + 1/4"}) + "\n"
                 + json.dumps({"id": "s", "question": "Simplify 6/8.", "answer": "\\frac{3}{4}"}) + "\n"
                 + json.dumps({"id": "e", "question": "Expand (x+1)^2.", "answer": "x^2+2x+1"}) + "\n")
    n, sym, poly = load_math_problems(str(f))
    assert n.payload["answer_format"] == "number" and "answer_format" not in sym.payload
    assert judge.judge(n, boxed("1")).verdict.status == "ok"
    assert judge.judge(n, boxed("x = 1")).verdict.status == "ok"
    for bad in ("3/4 + 1/4", "\\frac{3}{4} + \\frac{1}{4}", "2/2 + 0"):
        assert judge.judge(n, boxed(bad)).verdict.status == "wrong_answer", bad
    # symbolic equivalence stays the rule elsewhere
    assert judge.judge(sym, boxed("\\frac{6}{8}")).verdict.status == "ok"
    assert judge.judge(poly, boxed("(x+1)^2")).verdict.status == "ok"


# ----------------------------------------------------------------------------- reasoning-gym


def test_reasoning_gym_problems_use_their_scorer(judge):
    pytest.importorskip("reasoning_gym")
    from agentopd.envs.procedural import reasoning_gym_problems

    probs = reasoning_gym_problems("basic_arithmetic", n=5)
    assert len(probs) == 5 and all(callable(p.payload["scorer"]) for p in probs)
    for p in probs:
        ans = p.payload["answer"]
        ok = judge.judge(p, boxed(ans))
        assert ok.verdict.status == "ok" and ok.verdict.score == 1.0
        wrong = judge.judge(p, boxed(str(int(float(ans)) + 1)))
        assert wrong.verdict.status == "wrong_answer" and wrong.verdict.score == 0.0
    # same seed, same questions
    assert [p.prompt for p in reasoning_gym_problems("basic_arithmetic", n=5)] == [p.prompt for p in probs]


def test_a_scorer_that_raises_is_a_judge_error(judge):
    def boom(answer):
        raise RuntimeError("scorer exploded")

    j = judge.judge(Problem("x", "q", "math", {"answer": "1", "scorer": boom}), boxed("1"))
    assert j.verdict.status == "judge_error" and math.isnan(j.verdict.score)
    assert "scorer exploded" in j.verdict.details[0].error


# ---------------------------------------------------------------------- eval passk on math


def test_eval_passk_on_a_math_file(tmp_path):
    ds = tmp_path / "math.jsonl"
    rows = [{"id": "m1", "question": "1/2 as a decimal?", "answer": "0.5"},
            {"id": "m2", "question": "sqrt(8)?", "answer": "2\\sqrt{2}"},
            {"id": "m3", "question": "6*7?", "answer": "42"},
            {"id": "m4", "question": "unused", "answer": "1"}]
    ds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = [("m1", boxed("1/2")), ("m1", "The answer is 0.5."),      # 2/2
               ("m2", boxed("\\sqrt{8}")), ("m2", boxed("3\\sqrt{2}")),  # 1/2
               ("m3", boxed("41")), ("m3", "I am not sure.")]            # 0/2
    s = tmp_path / "samples.jsonl"
    s.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in samples))
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "agentopd.cli", "eval", "passk", "--dataset", str(ds), "--samples",
                        str(s), "--k", "1,2", "--json", str(out), "--quiet"], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert json.loads(r.stdout) == report
    assert report["pass@1"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    assert report["pass@2"] == pytest.approx(2 / 3)
    assert report["problems"] == 3 and report["samples"] == 6 and report["judge_errors"] == 0
    assert report["missing_problems"] == 1 and "1 problems of the dataset have no samples" in r.stderr
    results = [json.loads(line) for line in Path(str(s) + "_results.jsonl").read_text().splitlines()]
    assert report["results"] == str(s) + "_results.jsonl"
    assert [x["task_id"] for x in results] == [t for t, _ in samples]
    assert [x["passed"] for x in results] == [True, True, True, False, False, False]
    assert [x["result"] for x in results] == ["passed"] * 3 + ["failed: wrong_answer"] * 2 + ["failed: format_error"]
    assert all(x["completion"] == c for x, (_, c) in zip(results, samples))


# ------------------------------------------------------- reference solutions (privileged)

GSM8K = [  # openai/gsm8k's columns: the answer holds the rationale, then "#### <answer>"
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her "
                 "friends in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How "
                 "much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10"}]


def test_gsm8k_answer_follows_the_marks_and_the_rationale_is_the_reference(judge):
    ps = load_math_problems(GSM8K)
    assert [p.payload["answer"] for p in ps] == ["72", "10"]
    assert [p.privileged for p in ps] == [{"solution": r["answer"].split("\n#### ")[0]} for r in GSM8K]
    assert ps[0].privileged["solution"].endswith("72 clips altogether in April and May.")
    got = judge.judge_many([(ps[0], boxed("72")), (ps[1], boxed("10")), (ps[0], boxed("24")), (ps[1], boxed("0.2"))])
    assert [j.verdict.status for j in got] == ["ok", "ok", "wrong_answer", "wrong_answer"]


MATH_ROWS = [  # hendrycks competition_math's columns: no answer column, the solution boxes it
    {"problem": "If $x = 2$ and $y = 5$, then what is the value of $\\frac{x^4+2y^2}{6}$ ?", "level": "Level 1",
     "type": "Algebra", "solution": "We have  \\[\\frac{x^4 + 2y^2}{6} = \\frac{2^4 + 2(5^2)}{6} = \\frac{16+2(25)}{6} "
                                    "= \\frac{16+50}{6} = \\frac{66}{6} = \\boxed{11}.\\]"},
    {"problem": "Compute $\\sin 60^\\circ \\cdot \\cos 0^\\circ$.", "level": "Level 1", "type": "Precalculus",
     "solution": "First, $\\cos 0^\\circ = \\boxed{1}$. So the product is $\\sin 60^\\circ = "
                 "\\boxed{\\frac{\\sqrt{3}}{2}}$."}]


def test_math_answer_is_the_last_boxed_and_the_whole_solution_the_reference(judge):
    ps = load_math_problems(MATH_ROWS)
    assert [p.prompt for p in ps] == [r["problem"] for r in MATH_ROWS]
    assert [p.payload["answer"] for p in ps] == ["11", "\\frac{\\sqrt{3}}{2}"]
    assert [p.privileged for p in ps] == [{"solution": r["solution"]} for r in MATH_ROWS]
    got = judge.judge_many([(p, p.privileged["solution"]) for p in ps] + [(ps[1], boxed("1"))])
    assert [j.verdict.status for j in got] == ["ok", "ok", "wrong_answer"]
    assert [p.payload for p in load_problems(MATH_ROWS)] == [p.payload for p in ps]  # told apart as math rows
    # MATH-500's columns: an answer column, and the solution as the reference
    (m500,) = load_math_problems([{**MATH_ROWS[0], "answer": "11", "subject": "Algebra", "unique_id": "test/1.json"}])
    assert m500.payload["answer"] == "11" and m500.privileged == {"solution": MATH_ROWS[0]["solution"]}
    with pytest.raises(DataError, match="no answer"):
        load_math_problems([{"problem": "p", "solution": "It is 11."}])


def test_solution_column_is_configurable(judge, tmp_path):
    aqua = {"question": "A car goes 60 km in 1.5 hours. What is its speed in km/h?",
            "options": ["A)30", "B)40", "C)45", "D)50", "E)90"], "rationale": "Speed = 60 / 1.5 = 40 km/h. Answer: B",
            "correct": "B"}
    (p,) = load_math_problems([aqua], answer_key="correct")
    assert p.payload["answer"] == "B" and p.privileged == {"solution": aqua["rationale"]}
    rows = [{"id": "w", "q": "What is 6 * 7?", "a": "42", "worked": "6 * 7 = 42", "solution": "not this one"},
            {"id": "x", "q": "What is 1 + 1?", "a": "2"}]
    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = MathEnv(problems=str(f), question_key="q", answer_key="a", solution_key="worked", judge=_Shared(judge))
    assert [p.privileged for p in env.problems] == [{"solution": "6 * 7 = 42"}, {}]
    assert [p.privileged for p in load_math_problems(str(f), "q", "a")] == [{"solution": "not this one"}, {}]


def test_generated_references_are_judged_correct(judge):
    from agentopd.envs.procedural import micro_problems, micro_solution

    arith = [p for lv in (1, 2, 3, 4, 5) for p in arithmetic_problems(4, levels=(lv,), seed=lv)]
    micro = micro_problems(9, seed=2)
    assert all(p.privileged == {"solution": micro_solution(p)} for p in micro)
    assert [p.privileged["solution"] for p in arithmetic_problems(5, seed=3)] == [
        "40 + 85 = 125. \\boxed{125}", "57 * 79 = 4503. \\boxed{4503}",
        "(70 + 90) + 84 = 160 + 84 = 244. \\boxed{244}", "6x = 80 - 20 = 60, x = 60 / 6 = 10. \\boxed{10}",
        "4/5 - 8/9 = 36/45 - 40/45 = -4/45. \\boxed{-4/45}"]
    refs = [(p, p.privileged["solution"]) for p in arith + micro]
    assert [j.verdict.status for j in judge.judge_many(refs)] == ["ok"] * len(refs)
    shifted = [(p, q.privileged["solution"]) for p, q in zip(arith + micro, (arith + micro)[1:])]
    assert "ok" not in [j.verdict.status for j in judge.judge_many(shifted)]


def test_reasoning_gym_reference_is_its_answer(judge):
    pytest.importorskip("reasoning_gym")
    from agentopd.envs.procedural import reasoning_gym_problems

    probs = reasoning_gym_problems("basic_arithmetic", n=4, seed=3)
    assert all(p.privileged == {"solution": p.payload["answer"]} for p in probs)
    assert [judge.judge(p, boxed(p.privileged["solution"])).verdict.status for p in probs] == ["ok"] * 4


GENERATED_SHA256 = {  # of the problems' ids, prompts, kinds and payloads before references were added
    ("arithmetic", 0): "aa1fcb03aa722391c5ee9a81a47e94ce1a6569f8e22b58ad1ee362d268a6050a",
    ("arithmetic", 10_007): "2c4660120be350401b0d568c935e6eaca294298ed8b62dd3fba7abe770339a4f",
    ("micro", 0): "350058438b1497cca073b070f7f32a0a0f9fb91ded288f407f44d26b30bfa104",
    ("micro", 10_007): "fdb218c7bfee5343fb9400a6396430419799c55ab6615c837b157943919389f6",
    ("functions", 0): "623a5caa9108d39af4100fa11af99e50db464bee5ab830e9b390f29702c9a60c",
    ("functions", 10_007): "0fe14e6bdd149bb2e291fb476317242439c3621e5db64ca790575dba525e2496"}


@pytest.mark.parametrize("name, seed", sorted(GENERATED_SHA256))
def test_generated_problems_are_unchanged(name, seed):
    """The shipped micro model and the benchmarks depend on the generated problems themselves."""
    from agentopd.envs.procedural import generated_problems

    levels = {"arithmetic": (1, 2, 3, 4, 5), "micro": (1, 2, 3), "functions": (1, 2)}[name]
    rows = [[p.id, p.prompt, p.kind, p.payload] for p in generated_problems(name, 300, levels, seed)]
    assert hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest() == GENERATED_SHA256[name, seed]


def test_reset_info_carries_the_privileged_dict(judge):
    from agentopd.envs.math import math_vector_env
    from agentopd.envs.procedural import micro_solution

    env = MathEnv(problems="micro", n=6, levels=(1, 2, 3), judge=_Shared(judge))
    _, info = env.reset(options={"index": 2})
    assert info["privileged"] == {"solution": micro_solution(env.problems[2])}
    assert MathEnv(problems=GSM8K[:1], judge=_Shared(judge)).reset(seed=0)[1]["privileged"] == {
        "solution": GSM8K[0]["answer"].split("\n#### ")[0]}
    assert MathEnv(problems=[{"question": "1+1?", "answer": "2"}], judge=_Shared(judge)).reset(seed=0)[1][
        "privileged"] == {}
    venv = math_vector_env(2, problems=GSM8K, judge=_Shared(judge))
    _, infos = venv.reset(options={"index": [1, 0]})
    assert list(infos["privileged"]["solution"]) == [venv.problems[1].privileged["solution"],
                                                     venv.problems[0].privileged["solution"]]


def test_the_math_workers_import_agentopd_whatever_the_working_directory(tmp_path, monkeypatch):
    """Started from a directory holding another ``agentopd/`` (a checkout, or anything by that name),
    the math judge's workers still import the agentopd this process runs: never the one where the
    user stands (``python -m`` puts the working directory first on the path)."""
    from agentopd.judges.math import MathJudge

    fake = tmp_path / "agentopd"
    (fake / "judges").mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the agentopd in the working directory')\n")
    (fake / "judges" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    judge = MathJudge(workers=1)
    try:
        got = judge.judge_many([(Problem("p", "Compute 2 + 3.", "math", {"answer": "5"}), "\\boxed{5}"),
                                (Problem("q", "Compute 2 + 2.", "math", {"answer": "4"}), "\\boxed{5}")])
    finally:
        judge.close()
    assert [j.verdict.status for j in got] == ["ok", "wrong_answer"]

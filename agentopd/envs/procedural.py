"""Procedural math problems for training without a download.

``arithmetic_problems(n, levels, seed)`` is a seeded generator of arithmetic and algebra problems
at five difficulty levels (same seed, same problems):

1. add/subtract two 2-digit numbers       4. solve a*x + b = c for an integer x
2. multiply 2-digit by 1-2 digit numbers  5. add or subtract two fractions (reduced answer p/q)
3. three 2-digit numbers with brackets

``micro_problems(n, levels, seed)``: multi-digit addition and one-digit multiplication whose reference
answers (``micro_solution``) work column by column; ``function_problems(n, seed)``: "write f from
these examples" code problems with unit tests. Both feed the micro testbed (``agentopd.testbed.micro``);
``generated_problems(name, ...)`` picks a generator by name. Every generated problem carries a
reference solution in ``privileged["solution"]`` (what a teacher may see): the worked arithmetic,
``micro_solution``'s scratchpad, or the plain ``def f`` of a function problem.

``reasoning_gym_problems(name, n, seed)`` draws from a ``reasoning-gym`` generator (optional extra
``agentopd[reasoning-gym]``); its answers are scored by that dataset's own scorer.
"""
from __future__ import annotations

import math
import random
from fractions import Fraction

from agentopd.envs.data import reference
from agentopd.types import Problem

INSTRUCTION = "Put the final answer in \\boxed{}."


def _level1(r):
    a, b = r.randint(10, 99), r.randint(10, 99)
    op = r.choice("+-")
    task = f"{a} {op} {b}"
    return task, a + b if op == "+" else a - b, task


def _level2(r):
    a, b = r.randint(10, 99), r.randint(2, 99)
    task = f"{a} * {b}"
    return task, a * b, task


def _level3(r):
    a, b, c = (r.randint(10, 99) for _ in range(3))
    o1, o2 = r.choice("+-*"), r.choice("+-")
    expr = f"({a} {o1} {b}) {o2} {c}"
    return expr, eval(expr), f"{expr} = {eval(f'{a} {o1} {b}')} {o2} {c}"  # our own digits and operators only


def _level4(r):
    x, a, b = r.randint(-20, 20), r.randint(2, 12), r.randint(-50, 50)
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    work = f"{a}x = {c} {'-' if b >= 0 else '+'} {abs(b)} = {c - b}, x = {c - b} / {a}"
    return f"Solve for x: {a}x {sign} {abs(b)} = {c}.", x, work


def _level5(r):
    f, g = Fraction(r.randint(1, 9), r.randint(2, 9)), Fraction(r.randint(1, 9), r.randint(2, 9))
    op = r.choice("+-")
    v = f + g if op == "+" else f - g
    task = f"{f.numerator}/{f.denominator} {op} {g.numerator}/{g.denominator}"
    d = f.denominator * g.denominator // math.gcd(f.denominator, g.denominator)
    common = f"{f.numerator * d // f.denominator}/{d} {op} {g.numerator * d // g.denominator}/{d}"
    return task, v, task if common == task else f"{task} = {common}"


LEVELS = {1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5}
"""Each level draws ``(task, answer, work)``: ``work`` is the reference solution up to its last
``= answer``."""


def arithmetic_problems(n: int = 1000, levels=(1, 2, 3, 4, 5), seed: int = 0) -> list[Problem]:
    """``n`` problems spread evenly over ``levels``, deterministic in ``seed``. The reference
    solution (``privileged["solution"]``) works the task out and boxes the answer:
    ``"(12 * 3) - 40 = 36 - 40 = -4. \\boxed{-4}"``."""
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise ValueError(f"unknown arithmetic levels {bad}; choose from {sorted(LEVELS)}")
    r = random.Random(seed)
    out = []
    for i in range(n):
        level = levels[i % len(levels)]
        task, ans, work = LEVELS[level](r)
        q = task if task.startswith("Solve") else f"Compute {task}."
        answer = str(ans) if not isinstance(ans, Fraction) or ans.denominator != 1 else str(ans.numerator)
        out.append(Problem(f"arith-{seed}-{i}", f"{q} {INSTRUCTION}", "math",
                           {"answer": answer, "level": level, "answer_format": "number",
                            **({} if task.startswith("Solve") else {"expression": task})},
                           {"solution": f"{work} = {answer}. \\boxed{{{answer}}}"}))
    return out


def _digits(n: int) -> list[int]:
    return [int(c) for c in str(n)][::-1]  # least significant first


def _add_steps(a: int, b: int) -> str:
    """Column addition, right to left: "7 + 8 = 15, 4 + 3 + 1 = 8"."""
    da, db, carry, steps = _digits(a), _digits(b), 0, []
    for i in range(max(len(da), len(db))):
        terms = [d[i] for d in (da, db) if i < len(d)] + ([carry] if carry else [])
        steps.append(" + ".join(map(str, terms)) + f" = {sum(terms)}")
        carry = sum(terms) // 10
    return ", ".join(steps)


def _mul_steps(a: int, b: int) -> str:
    """Column multiplication by one digit, right to left: "7 * 8 = 56, 4 * 8 + 5 = 37"."""
    carry, steps = 0, []
    for d in _digits(a):
        v = d * b + carry
        steps.append(f"{d} * {b}" + (f" + {carry}" if carry else "") + f" = {v}")
        carry = v // 10
    return ", ".join(steps)


def micro_problems(n: int, levels=(1, 2, 3), seed: int = 0) -> list[Problem]:
    """Multi-digit arithmetic for the micro model (deterministic in ``seed``):
    1: two-digit + two-digit, 2: three-digit + two/three-digit, 3: two-digit * one-digit.
    The reference answer works column by column (``micro_solution``, also the problem's
    ``privileged["solution"]``), a scratchpad a few-million-parameter model can learn in minutes."""
    r, out = random.Random(seed), []
    for i in range(n):
        level = levels[i % len(levels)]
        if level == 1:
            a, b, op = r.randint(10, 99), r.randint(10, 99), "+"
        elif level == 2:
            a, b, op = r.randint(100, 999), r.randint(10, 999), "+"
        elif level == 3:
            a, b, op = r.randint(10, 99), r.randint(2, 9), "*"
        else:
            raise ValueError(f"unknown micro level {level}; choose from 1, 2, 3")
        value = a + b if op == "+" else a * b
        out.append(Problem(f"micro-{seed}-{i}", f"Compute {a} {op} {b}. {INSTRUCTION}", "math",
                           {"answer": str(value), "level": level, "a": a, "b": b, "op": op,
                            "answer_format": "number", "expression": f"{a} {op} {b}"}))
        out[-1].privileged["solution"] = micro_solution(out[-1])
    return out


def micro_solution(problem: Problem, value: int | None = None) -> str:
    """The reference response: the column scratchpad, then the boxed value (``value`` overrides the
    true one, for wrong attempts)."""
    p = problem.payload
    value = int(p["answer"]) if value is None else value
    steps = _add_steps(p["a"], p["b"]) if p["op"] == "+" else _mul_steps(p["a"], p["b"])
    return f"{steps}. \\boxed{{{value}}}"


LIST_OPS = [("sum(xs)", sum), ("max(xs)", max), ("min(xs)", min), ("len(xs)", len),
             ("xs[0]", lambda xs: xs[0]), ("xs[-1]", lambda xs: xs[-1]),
             ("sorted(xs)", sorted), ("xs[::-1]", lambda xs: xs[::-1])]

AMBIGUOUS = [("xs[-1]", "max(xs)"), ("xs[0]", "min(xs)"), ("xs[::-1]", "sorted(xs)")]
"""Pairs of list operations that agree on the shown examples of a problem (its lists end with their
maximum, start with their minimum, or are strictly decreasing). The first of each pair is the
environment's convention: its hidden tests break the tie that way."""
_OPS = dict(LIST_OPS)


def _affine(r: random.Random):
    """f(x) = a*x + b; the examples show three x in 2..9, the hidden tests are f(0) and f(1)."""
    a, b = r.choice([-3, -2, -1, 1, 2, 3, 4, 5]), r.randint(-9, 9)
    body = ("x" if a == 1 else "-x" if a == -1 else f"{a} * x") + (f" + {b}" if b > 0 else f" - {-b}" if b < 0 else "")
    return "x", body, [(x, a * x + b) for x in r.sample(range(2, 10), 3)], [(x, a * x + b) for x in (0, 1)]


def _tied_list(r: random.Random, pair: int, tied: bool) -> list[int]:
    """A list on which the two operations of ``AMBIGUOUS[pair]`` agree (``tied``) or differ."""
    while True:
        xs = [r.randint(0, 9) for _ in range(r.randint(3, 4))]
        if pair == 2:
            xs = sorted(set(xs), reverse=True) if tied else xs
        elif tied:
            i = xs.index(max(xs) if pair == 0 else min(xs))
            xs[i], xs[-1 if pair == 0 else 0] = xs[-1 if pair == 0 else 0], xs[i]
        first, second = (_OPS[op] for op in AMBIGUOUS[pair])
        if len(xs) >= 2 and (first(xs) == second(xs)) == tied:
            return xs


def _listop(r: random.Random, convention: bool):
    """A third of the time an operation the examples determine; else a pair of ``AMBIGUOUS`` that the
    three examples cannot tell apart, and two hidden tests that can (``convention``: the first of
    the pair is the answer, else either, at random)."""
    if r.random() < 1 / 3:
        body, fn = r.choice([op for op in LIST_OPS if op[0] in ("sum(xs)", "len(xs)", "max(xs)", "min(xs)")])
        while True:  # examples that no other operation fits
            cases = [[r.randint(0, 9) for _ in range(r.randint(2, 4))] for _ in range(5)]
            if not any(all(g(c) == fn(c) for c in cases[:3]) for b, g in LIST_OPS if b != body):
                return "xs", body, [(c, fn(c)) for c in cases[:3]], [(c, fn(c)) for c in cases[3:]]
    pair = r.randrange(len(AMBIGUOUS))
    body = AMBIGUOUS[pair][0 if convention else r.randrange(2)]
    fn = _OPS[body]
    shown = [_tied_list(r, pair, True) for _ in range(3)]
    hidden = [_tied_list(r, pair, False) for _ in range(2)]
    return "xs", body, [(c, fn(c)) for c in shown], [(c, fn(c)) for c in hidden]


def function_problems(n: int, seed: int = 0, convention: bool = True) -> list[Problem]:
    """``n`` problems "write f from these examples": affine integer maps (every third id) and list
    operations (the others). The prompt shows three examples; two hidden tests come first in the test
    list, so the test judge's critique quotes them when they fail (input, expected, got). Some list
    problems are ambiguous: their examples fit two operations (``AMBIGUOUS``) and the hidden tests
    decide; ``convention=False`` (the warm start) lets either be the answer at random, so a model
    must learn the environment's convention from its test feedback."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        arg, body, shown, hidden = _affine(r) if i % 3 == 0 else _listop(r, convention)
        prompt = f"Write a Python function f({arg}) such that:\n" + "\n".join(f"f({x!r}) == {y!r}" for x, y in shown)
        tests = [f"assert f({x!r}) == {y!r}" for x, y in hidden + shown]
        out.append(Problem(f"fn-{seed}-{i}", prompt, "code",
                           {"style": "call", "tests": tests, "setup": "",
                            "public_tests": tests[len(hidden):]},
                           {"solution": f"def f({arg}):\n    return {body}"}))
    return out


def function_solution(problem: Problem) -> str:
    return f"```python\n{problem.privileged['solution']}\n```"


GENERATORS = {"arithmetic": "math", "micro": "math", "functions": "code"}
HELDOUT_SEED = 10_007
"""The seed of generated held-out problems: no warm start or training run draws from it."""


def generated_problems(name: str, n: int, levels=(1, 2), seed: int = 0) -> list[Problem]:
    """Problems from the generator ``name`` (see ``GENERATORS``; levels apply to the math ones)."""
    if name == "arithmetic":
        return arithmetic_problems(n, tuple(levels), seed)
    if name == "micro":
        return micro_problems(n, tuple(levels), seed)
    if name == "functions":
        return function_problems(n, seed)
    raise ValueError(f"unknown generator {name!r}; choose from {', '.join(GENERATORS)}")


def reasoning_gym_problems(name: str, n: int = 100, seed: int = 0, **config) -> list[Problem]:
    """Problems from reasoning-gym's generator ``name``, scored by its own ``score_answer``; the
    reference solution (``privileged["solution"]``) is the entry's answer as reasoning-gym gives it."""
    try:
        import reasoning_gym
    except ImportError:
        raise ImportError("reasoning-gym problems need the optional extra: pip install 'agentopd[reasoning-gym]'") from None
    ds = reasoning_gym.create_dataset(name, size=n, seed=seed, **config)
    out = []
    for i, entry in enumerate(ds):
        out.append(Problem(f"{name}-{seed}-{i}", f"{entry['question']} {INSTRUCTION}", "math",
                           {"answer": str(entry["answer"]),
                            "scorer": lambda ans, e=entry: ds.score_answer(ans, e)},
                           reference(None if entry["answer"] is None else str(entry["answer"]))))
    return out


def problem_set(problems, kind: str, load, n: int, levels, seed: int, split: str = "train",
                heldout_n: int = 0) -> list[Problem]:
    """An env's problems: ``problems`` names a generator of ``kind`` problems (``n`` of them from
    ``seed``; ``split="heldout"``: from :data:`HELDOUT_SEED` instead, and ``"train"`` leaves out any
    prompt among the first ``heldout_n`` held-out ones), or anything else is given to ``load``."""
    if not (isinstance(problems, str) and problems in GENERATORS):
        return load(problems)
    if GENERATORS[problems] != kind:
        raise ValueError(f"problems={problems!r} makes {GENERATORS[problems]} problems, not {kind}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if split == "heldout":
        return generated_problems(problems, n, levels, HELDOUT_SEED)
    out = generated_problems(problems, n, levels, seed)
    if heldout_n:
        seen = {p.prompt for p in generated_problems(problems, heldout_n, levels, HELDOUT_SEED)}
        out = [p for p in out if p.prompt not in seen]
    return out

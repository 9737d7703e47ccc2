"""Procedural math problems for training without a download.

``arithmetic_problems(n, levels, seed)`` is a seeded generator of arithmetic and algebra problems
at five difficulty levels (same seed, same problems):

1. add/subtract two 2-digit numbers       4. solve a*x + b = c for an integer x
2. multiply 2-digit by 1-2 digit numbers  5. add or subtract two fractions (reduced answer p/q)
3. three 2-digit numbers with brackets

``reasoning_gym_problems(name, n, seed)`` draws from a ``reasoning-gym`` generator (optional extra
``agentopd[reasoning-gym]``); its answers are scored by that dataset's own scorer.
"""
from __future__ import annotations

import random
from fractions import Fraction

from agentopd.types import Problem

INSTRUCTION = "Put the final answer in \\boxed{}."


def _level1(r):
    a, b = r.randint(10, 99), r.randint(10, 99)
    op = r.choice("+-")
    return f"{a} {op} {b}", a + b if op == "+" else a - b


def _level2(r):
    a, b = r.randint(10, 99), r.randint(2, 99)
    return f"{a} * {b}", a * b


def _level3(r):
    a, b, c = (r.randint(10, 99) for _ in range(3))
    o1, o2 = r.choice("+-*"), r.choice("+-")
    expr = f"({a} {o1} {b}) {o2} {c}"
    return expr, eval(expr)  # our own digits and operators only


def _level4(r):
    x, a, b = r.randint(-20, 20), r.randint(2, 12), r.randint(-50, 50)
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    return f"Solve for x: {a}x {sign} {abs(b)} = {c}.", x


def _level5(r):
    f, g = Fraction(r.randint(1, 9), r.randint(2, 9)), Fraction(r.randint(1, 9), r.randint(2, 9))
    op = r.choice("+-")
    v = f + g if op == "+" else f - g
    return f"{f.numerator}/{f.denominator} {op} {g.numerator}/{g.denominator}", v


LEVELS = {1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5}


def arithmetic_problems(n: int = 1000, levels=(1, 2, 3, 4, 5), seed: int = 0) -> list[Problem]:
    """``n`` problems spread evenly over ``levels``, deterministic in ``seed``."""
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise ValueError(f"unknown arithmetic levels {bad}; choose from {sorted(LEVELS)}")
    r = random.Random(seed)
    out = []
    for i in range(n):
        level = levels[i % len(levels)]
        task, ans = LEVELS[level](r)
        q = task if task.startswith("Solve") else f"Compute {task}."
        answer = str(ans) if not isinstance(ans, Fraction) or ans.denominator != 1 else str(ans.numerator)
        out.append(Problem(f"arith-{seed}-{i}", f"{q} {INSTRUCTION}", "math",
                           {"answer": answer, "level": level}))
    return out


def reasoning_gym_problems(name: str, n: int = 100, seed: int = 0, **config) -> list[Problem]:
    """Problems from reasoning-gym's generator ``name``, scored by its own ``score_answer``."""
    try:
        import reasoning_gym
    except ImportError:
        raise ImportError("reasoning-gym problems need the optional extra: pip install 'agentopd[reasoning-gym]'") from None
    ds = reasoning_gym.create_dataset(name, size=n, seed=seed, **config)
    out = []
    for i, entry in enumerate(ds):
        out.append(Problem(f"{name}-{seed}-{i}", f"{entry['question']} {INSTRUCTION}", "math",
                           {"answer": str(entry["answer"]),
                            "scorer": lambda ans, e=entry: ds.score_answer(ans, e)}))
    return out

"""Code extraction from chat answers (agentopd/judges/extract.py): the ways real chat models format
code (unopened and unclosed fences, several blocks, example prints, ``if __name__`` demos, prose
before and after, a bare function body), as pure functions and through the test judge on HumanEval/0
in the real sandbox."""
from __future__ import annotations

import pytest
from agentopd.envs.data import load_humaneval
from agentopd.judges.extract import definitions, extract_code, problem_code
from agentopd.judges.tests import TestJudge as Judge
from sandbox_probe import bwrap_or_skip

F = "def f(x):\n    return x + 1\n"


@pytest.mark.parametrize("answer, program, defs", [
    # the SmolLM2 HumanEval/0 shape: code, a closing fence it never opened, then prose
    (F + "```\n\nThis adds one. For example, f(1) gives 2.", F, F),
    ("Here you go:\n```python\n" + F, F, F),  # never closed
    ("Sure! The function:\n" + F + "It returns x plus one.", F, F),  # no fences, prose around
    ("```python\n" + F + "```\nUsage:\n```python\nprint(f(1))\n```", "print(f(1))\n", F),  # usage block
    ("```python\n" + F + "\nif __name__ == '__main__':\n    print(f(int(input())))\n```",
     F + "\nif __name__ == '__main__':\n    print(f(int(input())))\n", F),
    ("```python\n" + F + "```\nOutput:\n```\n2\n```", F, F),  # an output block is not code
    ("```python\n" + F + "```\n```bash\npython f.py\n```", F, F),  # nor is another language's
    ("  ```python\n  " + F.replace("\n    ", "\n      ") + "  ```", F, F),  # a fence indented in a list item
    ("```python\ndef g(y):\n    return y\n```\nthen\n```python\n" + F + "```", F, "def g(y):\n    return y\n" + F),
    ("Example\n\nOutput: 5", None, None),  # prose that compiles is not code
    ("```python\ndef f(x) return x\n```", "def f(x) return x\n", "def f(x) return x\n"),  # judged: a syntax error
])
def test_extract_code(answer, program, defs):
    assert extract_code(answer) == program
    assert extract_code(answer, call=True) == defs


def test_definitions_keep_what_the_functions_and_tests_read():
    code = ("import math\nMOD = 7\nBASE = MOD * 2\nnumbers = [1, 2]\ndef g(y):\n    return y % BASE\n"
            "@staticmethod\ndef h():\n    return 0\nclass C:\n    pass\nprint(g(numbers[0]))\nresult = g(3)\n"
            "for n in numbers:\n    print(n)\nassert g(1) == 1\nLIMIT = 3\n")
    assert definitions(code) == ("import math\nMOD = 7\nBASE = MOD * 2\ndef g(y):\n    return y % BASE\n"
                                 "@staticmethod\ndef h():\n    return 0\nclass C:\n    pass\n")
    assert definitions(code, roots={"LIMIT"}).endswith("LIMIT = 3\n")  # a name the tests use
    assert definitions("add = lambda a, b: a + b\nprint(add(1, 2))\n", roots={"add"}) == "add = lambda a, b: a + b\n"


def test_a_body_without_its_def_follows_the_prompt():
    he0 = load_humaneval()[0]
    body = he0.privileged["solution"][len(he0.prompt):]
    assert problem_code(he0, body) == body.strip("\n") + "\n"
    assert problem_code(he0, "Example") is None


@pytest.fixture(scope="module")
def judge():
    sb = bwrap_or_skip(workers=2)
    j = Judge(sandbox=sb, timeout_s=5.0)
    yield j
    j.close()
    sb.close()


def shapes(solution: str, body: str) -> dict[str, str]:
    """HumanEval/0's canonical solution as chat models format code."""
    demo = "print(has_close_elements([1.0, 2.0], 0.5))\n"
    return {
        "unopened fence": solution + "```\n\nThis checks every pair. Example: has_close_elements([1.0], 0.5)",
        "unclosed fence": "Here is the function:\n```python\n" + solution,
        "prose around": "Sure! Here is the code:\n" + solution + "\nThis compares every pair of numbers.",
        "usage block after": "```python\n" + solution + "```\n\nUsage:\n```python\n" + demo + "```",
        "a crashing example call": "```python\n" + solution + "\nprint(has_close_elements())\n```",
        "a __main__ block reading stdin": ("```python\n" + solution + "\nif __name__ == '__main__':\n"
                                           "    print(has_close_elements(eval(input()), 0.5))\n```"),
        "the body alone": body,
        "helper in an earlier block": ("```python\ndef close(a, b, t):\n    return abs(a - b) < t\n```\nThen:\n"
                                       "```python\nfrom typing import List\n\n\ndef has_close_elements(numbers: "
                                       "List[float], threshold: float) -> bool:\n    return any(close(a, b, threshold)"
                                       " for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```"),
    }


def test_chat_shapes_of_a_correct_answer_pass(judge):
    he0 = load_humaneval()[0]
    solution = he0.privileged["solution"]
    body = solution[len(he0.prompt):]
    cases = shapes(solution, body)
    verdicts = judge.judge_many([(he0, a) for a in cases.values()])
    assert {k: j.verdict.status for k, j in zip(cases, verdicts)} == {k: "ok" for k in cases}
    # the same shapes with a wrong function still fail: extraction adds nothing
    wrong = shapes(solution.replace("< threshold", "> threshold"), body.replace("< threshold", "> threshold"))
    wrong["helper in an earlier block"] = wrong["helper in an earlier block"].replace("< t\n", "> t\n")
    assert all(j.verdict.status == "wrong_answer" for j in judge.judge_many([(he0, a) for a in wrong.values()]))


def test_every_canonical_humaneval_solution_survives_extraction(judge):
    """Each of the 164 reference solutions (prompt + canonical body), as a chat answer: fenced with
    prose around it, and with a demo call after it; the extracted code passes."""
    problems = load_humaneval()
    answers = [f"Here it is:\n```python\n{p.privileged['solution']}```\nDone." for p in problems]
    answers += [f"```python\n{p.privileged['solution']}\nprint({p.payload['entry_point']}())\n```" for p in problems]
    verdicts = judge.judge_many(list(zip(problems + problems, answers)))
    failed = [(p.id, j.verdict.status) for p, j in zip(problems + problems, verdicts) if j.verdict.status != "ok"]
    assert failed == []


def test_an_example_assignment_named_like_a_parameter_is_dropped():
    code = ("def f(numbers, k):\n    total = 0\n    for x in numbers:\n        total += x * SCALE\n    return total\n"
            "SCALE = 2\nnumbers = [1, 2]\ntotal = f(numbers, 3)\ndef g():\n    global count\n    count += 1\ncount = 0\n")
    assert definitions(code) == ("def f(numbers, k):\n    total = 0\n    for x in numbers:\n        total += x * SCALE\n"
                                 "    return total\nSCALE = 2\ndef g():\n    global count\n    count += 1\ncount = 0\n")


def test_a_table_filled_at_the_top_level_is_kept_and_a_demo_loop_is_not(judge):
    from agentopd.types import Problem

    code = ("PRIMES = []\nfor n in range(2, 50):\n    if all(n % p for p in PRIMES):\n        PRIMES.append(n)\n"
            "SQUARES = {}\nfor i in range(10):\n    SQUARES[i] = i * i\nLOOKUP = set()\nLOOKUP.update(PRIMES)\n"
            "def nth_prime(k):\n    return PRIMES[k] + SQUARES[0] + len(LOOKUP) * 0\n"
            "for k in range(3):\n    print(nth_prime(k))\nif __name__ == '__main__':\n    PRIMES.clear()\n"
            "extra = int(input())\nPRIMES.append(extra)\n")
    kept = definitions(code)
    assert kept == code[:code.index("for k in range(3)")]  # the table loops kept; the demo, stdin and __main__ not
    p = Problem("p", "p", "code", {"style": "call", "tests": ["assert nth_prime(0) == 2", "assert nth_prime(3) == 7"]})
    assert judge.judge(p, "```python\n" + code + "```").verdict.status == "ok"

"""Test cases in the datasets' own encodings, made into the test judge's two styles (stdlib only;
errors are ``ValueError`` lines that :mod:`agentopd.envs.data` prefixes with the file and row).

- **Named test sets** (:func:`choose`). CodeContests has ``public``, ``private`` and ``generated``
  tests, LiveCodeBench ``public`` and ``private`` ones. ``judge_tests`` names the sets that decide
  the reward (default ``private`` and ``generated``; a row with none of them is judged on its public
  tests) and ``critique_tests`` the sets whose failures make the critique and end a multi-turn
  episode (default ``public``), as RLEF does: the public tests talk, the hidden ones judge.
- **LiveCodeBench** (``livecodebench/code_generation_lite``): ``public_test_cases`` is a JSON
  string, ``private_test_cases`` the same JSON string pickled, zlib-compressed and base64-encoded
  (older releases: plain JSON). :func:`decode_cases` reads both; its unpickler refuses anything
  but plain strings, so a row cannot run code on the host.
- **Call-style (functional) cases**: LiveCodeBench's ``testtype: functional`` (each input line one
  JSON argument, the output one JSON value) and TACO/APPS rows with an ``fn_name`` (``inputs[i]``
  the argument list, ``outputs[i]`` the value, often wrapped in a one-element list). Each case
  becomes an assert the judge's driver runs against the program, e.g. ``assert
  findIntersectionValues([4, 3, 2, 3, 1], [2, 2, 5, 2, 3, 6]) == [3, 4]``; :func:`call_prefix` is
  prepended to the program: common imports (``typing``'s ``List`` for the starter code's hints) and
  a function of that name that calls the method on a new ``Solution()`` (LeetCode's class) and
  returns a tuple as a list, as LiveCodeBench's grader does; a program that defines the function
  itself replaces it.
"""
from __future__ import annotations

import ast
import base64
import io
import json
import pickle
import zlib

TEST_SETS = ("public", "private", "generated")
"""The test sets a row may name (CodeContests: all three; LiveCodeBench: public and private)."""

DEFAULT_JUDGE = ("private", "generated")
DEFAULT_CRITIQUE = ("public",)

IMPORTS = ("from typing import *\nfrom collections import *\nfrom functools import *\nfrom itertools import *\n"
           "from heapq import *\nfrom bisect import *\nfrom math import *\n"
           "import bisect, collections, functools, heapq, itertools, math, re, string, sys\n")
"""What a call-style program may use without importing it (LiveCodeBench's grader prepends the like)."""


def check_sets(names, what: str) -> tuple[str, ...] | None:
    """``names`` (a list of :data:`TEST_SETS`) as a tuple, None for None; else ValueError naming ``what``."""
    if names is None:
        return None
    if isinstance(names, str) or not all(n in TEST_SETS for n in names) or not names:
        raise ValueError(f"{what}: a non-empty list of {', '.join(TEST_SETS)}; got {names!r}")
    return tuple(names)


def choose(sets: dict, judge=None, critique=None) -> tuple[list, list]:
    """``(judging tests, critique tests)`` from a row's named ``sets`` (name -> list of tests):
    the ``judge`` sets (default :data:`DEFAULT_JUDGE`; the public tests when those are all empty)
    and the ``critique`` sets (default :data:`DEFAULT_CRITIQUE`), each in the order named."""
    def tests(names):
        return [t for n in names for t in sets.get(n) or []]

    return (tests(judge or DEFAULT_JUDGE) or tests(["public"])), tests(critique or DEFAULT_CRITIQUE)


# ------------------------------------------------------------------------------- LiveCodeBench


class _StringsOnly(pickle.Unpickler):
    """An unpickler that builds no object but the builtin values (a pickled string needs none)."""

    def find_class(self, module, name):
        raise ValueError(f"the pickled test cases name {module}.{name}; only a JSON string is allowed")


def decode_cases(text) -> list:
    """LiveCodeBench's test cases: a JSON list (or its string), or the JSON string pickled,
    zlib-compressed and base64-encoded."""
    if isinstance(text, list):
        return text
    if not isinstance(text, str) or not text.strip():
        return []
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        inner = _StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(text.encode())))).load()
        return json.loads(inner)
    except (ValueError, zlib.error, pickle.UnpicklingError, TypeError, EOFError) as e:
        raise ValueError(f"test cases are neither JSON nor LiveCodeBench's compressed JSON ({e})") from None


def func_name(metadata) -> str | None:
    """``metadata["func_name"]`` (the column may be a JSON string), or None."""
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata) if metadata.strip() else {}
        except json.JSONDecodeError:
            raise ValueError("'metadata' is a string but not JSON") from None
    name = (metadata or {}).get("func_name") if isinstance(metadata, dict) else None
    return name or None


def _literal(value) -> str:
    """``value`` as Python source that evaluates to it (a JSON value: no NaN or infinity)."""
    text = repr(value)
    if ast.literal_eval(text) != value:
        raise ValueError(f"test value {text[:80]} has no Python literal")
    return text


def call_test(name: str, args: list, expected, wrapped: bool = False) -> str:
    """One assert: ``name(*args) == expected``; ``wrapped`` (APPS): a one-element list also
    matches its element, ``name(*args) in ([x], x)``."""
    call = f"{name}({', '.join(_literal(a) for a in args)})"
    if wrapped and isinstance(expected, list) and len(expected) == 1:
        return f"assert {call} in ({_literal(expected)}, {_literal(expected[0])})"
    return f"assert {call} == {_literal(expected)}"


def call_prefix(name: str) -> str:
    """:data:`IMPORTS` and a module-level ``name`` that calls ``Solution().name`` (a tuple returned as a list)."""
    if not name.isidentifier():
        raise ValueError(f"func_name {name!r} is not a Python name")
    return (f"{IMPORTS}\n\ndef {name}(*args, **kwargs):\n    out = Solution().{name}(*args, **kwargs)\n"
            "    return list(out) if isinstance(out, tuple) else out\n")


def lcb_tests(cases: list, name: str | None) -> list:
    """A LiveCodeBench test list as the judge's tests: asserts (functional cases, calling
    ``name``) or ``{"input", "output"}`` pairs (stdin cases)."""
    out = []
    for case in cases:
        if not isinstance(case, dict) or "input" not in case or "output" not in case:
            raise ValueError("a LiveCodeBench test case needs 'input' and 'output'")
        if case.get("testtype", "stdin") != "functional":
            out.append({"input": case["input"], "output": case["output"]})
            continue
        if not name:
            raise ValueError("a functional test case needs metadata.func_name")
        try:
            args = [json.loads(line) for line in case["input"].split("\n") if line.strip()]
            out.append(call_test(name, args, json.loads(case["output"])))
        except json.JSONDecodeError:
            raise ValueError("a functional test case's input lines and output must be JSON") from None
    return out


def apps_call_tests(io_spec: dict) -> list[str]:
    """TACO/APPS ``input_output`` with an ``fn_name``: one assert per (arguments, value) pair."""
    name = io_spec["fn_name"]
    pairs = zip(io_spec.get("inputs") or [], io_spec.get("outputs") or [])
    return [call_test(name, args if isinstance(args, list) else [args], out, wrapped=True) for args, out in pairs]

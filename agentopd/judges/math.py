"""The math judge: extract the final answer, check it with math-verify in bounded time.

The answer is the last ``\\boxed{...}`` (or ``\\fbox{...}``) in the response, else the last match of
a final-answer pattern; none is a ``format_error``. Equivalence (``1/2`` = ``0.5``, ``\\sqrt{8}`` =
``2\\sqrt{2}``, sets, intervals, ...) is decided by math-verify in worker processes with a hard
deadline: a pathological expression costs at most ``timeout_s`` and gives ``judge_error`` (the
verifier failed, not the answer), never a hung step. The critique names the expected answer only
when ``reveal_answer`` is set: the reference is privileged information.

Where a number is asked for (``payload["answer_format"] == "number"``: every generated arithmetic
family, and dataset rows that say so) the answer must be one (``12``, ``-3.5``, ``7/4``,
``\\frac{7}{4}``, ``x = 5``): an expression, even an equivalent one, is a wrong answer whose
critique says a number was asked for. An answer that restates the question's own expression
(``payload["expression"]``) never passes, in any format.
"""
from __future__ import annotations

import os
import re

from agentopd.judges.base import BaseJudge, judge_error

from agentopd.sandbox.workers import WorkerPool, module_worker, wall_limit
from agentopd.threads import worker_count
from agentopd.types import Judgement, Problem, Verdict

DEFAULT_PATTERN = r"(?i)\banswer\s*(?:is|:)\s*:?\s*\$?(.+?)\$?\s*\.?\s*$"


def _boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} / \\fbox{...} with balanced braces."""
    found = []  # (position, contents): the last one wins, braced or not
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth = 1
        for i in range(m.end(), len(text)):
            depth += (text[i] == "{") - (text[i] == "}")
            if depth == 0:
                found.append((m.start(), text[m.end():i].strip()))
                break
    found += [(m.start(), m.group(1)) for m in re.finditer(r"\\boxed ([^\s${][^\s$]*)", text)]  # \boxed 5
    return max(found)[1] if found else None


def extract_answer(text: str, pattern: str | None = DEFAULT_PATTERN) -> str | None:
    """The last boxed answer, else the last line matching ``pattern`` (group 1)."""
    ans = _boxed(text)
    if ans:
        return ans
    if pattern:
        hits = [m for line in text.splitlines() if (m := re.search(pattern, line.strip()))]
        if hits:
            return hits[-1].group(1).strip() or None
    return None


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:/\d+)?|[-+]?\.\d+")
_FRAC = re.compile(r"[-+]?\\[dt]?frac\{\d+\}\{\d+\}")
_LATEX = {"\\times": "*", "\\cdot": "*", "\\div": "/", "\\left": "", "\\right": "", "\u2212": "-",
          "\u00d7": "*", "\u00f7": "/", "{,}": ",", "\\,": "", "\\!": "", "$": ""}


def _plain(text: str) -> str:
    """The answer without spacing, math delimiters or LaTeX spellings of + - * /."""
    for a, b in _LATEX.items():
        text = text.replace(a, b)
    text = re.sub(r"\s+", "", text.replace("\\(", "").replace("\\)", ""))
    return text.rstrip(".")


def is_number(answer: str) -> bool:
    """A number as written (an integer, a decimal, a fraction of integers), not an expression;
    ``x = 5`` and ``(-5)`` count."""
    a = re.sub(r"^[a-zA-Z]=", "", _plain(answer))
    a = a[1:-1] if a.startswith("(") and a.endswith(")") else a
    return bool(_NUMBER.fullmatch(a) or _FRAC.fullmatch(a))


def form_error(problem: Problem, answer: str) -> str | None:
    """Why an answer is not in the asked form (a restated question, an expression where a number
    was asked for), or None."""
    expr = problem.payload.get("expression")
    if expr and _plain(answer) == _plain(expr):
        return f"Your final answer {answer} restates the question; give its value."
    if problem.payload.get("answer_format") == "number" and not is_number(answer):
        return f"A number was asked for, and {answer} is not a number: evaluate it and give the result."
    return None


class MathVerifier:
    """math-verify in a pool of worker processes with a hard per-call deadline: ``timeout_s`` of the
    worker's CPU time, which the machine's load does not change (the same answer gets the same
    verdict on a busy machine), and :func:`agentopd.sandbox.workers.wall_limit` of wall-clock time."""

    def __init__(self, workers: int | None = None, timeout_s: float = 5.0):
        self.timeout_s = timeout_s
        self.pool = WorkerPool(self._start, worker_count(workers))

    @staticmethod
    def _start(slot, key):
        # (PYTHONHASHSEED: sympy's set orders, and so its answers, the same in every worker)
        return module_worker("agentopd.judges.math_worker",
                             env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONHASHSEED": "0"})

    def equivalent(self, gold: str, pred: str) -> tuple[bool | None, str]:
        """(True/False, note), or (None, reason) when the verifier failed or ran out of time."""
        try:
            reply = self.pool.call({"gold": gold, "pred": pred}, wall_limit(self.timeout_s), cpu_s=self.timeout_s)
        except RuntimeError as e:
            return None, f"math verifier did not start: {e}"
        if reply is None:
            return None, f"math verification took more than {self.timeout_s:g} s of CPU time"
        if "error" in reply:
            return None, reply["error"]
        return reply["ok"], reply.get("parsed", "")

    def close(self):
        self.pool.close()


class MathJudge(BaseJudge):
    """Scores 1 for an answer equivalent to ``payload["answer"]``, 0 otherwise. Problems whose
    payload names a ``scorer`` (e.g. reasoning-gym) are scored by it instead."""

    name = "math"

    def __init__(self, reveal_answer: bool = False, timeout_s: float = 5.0, pattern: str | None = DEFAULT_PATTERN,
                 workers: int | None = None):
        self.reveal_answer = reveal_answer
        self.pattern = pattern
        self.workers = worker_count(workers)
        self.verifier = MathVerifier(self.workers, timeout_s)

    def judge(self, problem: Problem, response: str) -> Judgement:
        answer = extract_answer(response, self.pattern)
        if answer is None:
            return Judgement(Verdict(0.0, 0, 1, "format_error"),
                             "No final answer found. End with the answer in \\boxed{...}.")
        form = form_error(problem, answer)
        if form:
            return Judgement(Verdict(0.0, 0, 1, "wrong_answer"), form)
        scorer = problem.payload.get("scorer")
        if scorer is not None:
            try:
                score = float(scorer(answer))
            except Exception as e:  # a crashed scorer is the judge's failure
                return judge_error(f"scorer failed: {type(e).__name__}: {e}")
            ok, note = score >= 1.0, ""
        else:
            ok, note = self.verifier.equivalent(str(problem.payload["answer"]), answer)
            if ok is None:
                return judge_error(note)
            score = float(ok)
        status = "ok" if ok else "wrong_answer"
        if ok:
            critique = f"Correct: {answer}."
        else:
            critique = f"Your final answer {answer} is incorrect."
            if self.reveal_answer and "answer" in problem.payload:
                critique += f" The expected answer is {problem.payload['answer']}."
        return Judgement(Verdict(score, int(ok), 1, status), critique)

    def close(self):
        self.verifier.close()

"""Helpers of the resume-equality tests (test_eval_model, test_rlef): an engine that stops the run
on a chosen call (as a kill would), a judge whose verdict depends on the answer's text alone, and
the rows of a results file keyed by (task_id, sample_index)."""
from __future__ import annotations

import json
from pathlib import Path

from agentopd.types import Judgement, Verdict


class Interrupted(Exception):
    pass


class StopOnCall:
    """Delegates to ``engine``; raises :class:`Interrupted` on call number ``stop`` (1-based)."""

    def __init__(self, engine, stop: int):
        self.engine, self.stop, self.calls = engine, stop, 0
        self.tokenizer = engine.tokenizer

    def generate(self, *a, **kw):
        self.calls += 1
        if self.calls == self.stop:
            raise Interrupted(f"stopped on call {self.calls}")
        return self.engine.generate(*a, **kw)


class TextJudge:
    """``ok`` when the answer's length is even, else ``wrong_answer`` with a critique."""

    def judge_many(self, pairs, progress=None):
        return [Judgement(Verdict(1.0, 1, 1, "ok")) if len(t) % 2 == 0 else
                Judgement(Verdict(0.0, 0, 1, "wrong_answer"), f"odd length {len(t)}") for _, t in pairs]

    def judge(self, problem, text):
        return self.judge_many([(problem, text)])[0]


def rows_by_key(path) -> dict:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return {(r["task_id"], r["sample_index"]): r for r in rows}

"""The composite judge: several judges on the same response, scores weighted, critiques joined.

Its status is ``ok`` only when every part is ``ok``; otherwise the first failing part's status.
Any part's ``judge_error`` makes the whole a ``judge_error``.
"""
from __future__ import annotations

from agentopd.judges.base import BaseJudge, judge_error, make_judge

from agentopd.types import Judgement, Problem, Verdict


class CompositeJudge(BaseJudge):
    name = "composite"

    def __init__(self, judges: list, weights: list[float] | None = None):
        """``judges``: judge specs (names, import paths, dicts, objects) or dicts
        ``{"judge": spec, "weight": w}``."""
        if not judges:
            raise ValueError("composite judge needs at least one judge")
        parts, ws = [], []
        for i, j in enumerate(judges):
            if isinstance(j, dict) and "judge" in j:
                parts.append(make_judge(j["judge"]))
                ws.append(float(j.get("weight", 1.0)))
            else:
                parts.append(make_judge(j))
                ws.append(float(weights[i]) if weights else 1.0)
        if any(w < 0 for w in ws) or sum(ws) <= 0:
            raise ValueError(f"composite judge weights must be >= 0 and not all 0, got {ws}")
        self.judges, self.weights = parts, ws
        self.workers = max(getattr(p, "workers", 1) for p in parts)

    def _combine(self, js: list[Judgement]) -> Judgement:
        errors = [j for j in js if j.verdict.status == "judge_error"]
        if errors:
            return judge_error("; ".join(d.error for j in errors for d in j.verdict.details) or "a part failed")
        total_w = sum(self.weights)
        score = sum(w * j.verdict.score for w, j in zip(self.weights, js)) / total_w
        bad = [j.verdict.status for j in js if j.verdict.status != "ok"]
        passed = sum(j.verdict.passed for j in js)
        total = sum(j.verdict.total for j in js)
        details = [d for j in js for d in j.verdict.details]
        critique = "\n\n".join(j.critique for j in js if j.critique)
        return Judgement(Verdict(score, passed, total, bad[0] if bad else "ok", details), critique)

    def judge(self, problem: Problem, response: str) -> Judgement:
        return self._combine([j.judge(problem, response) for j in self.judges])

    def judge_many(self, pairs, progress=None):
        per_judge = [j.judge_many(pairs) for j in self.judges]  # each part batches its own way
        out = [self._combine(list(js)) for js in zip(*per_judge)]
        if progress:
            progress(len(out))
        return out

    def close(self):
        for j in self.judges:
            close = getattr(j, "close", None)
            if close:
                close()

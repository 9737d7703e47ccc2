"""A custom judge to copy: the test judge's verdict, plus a style critique from ruff.

Use it in a config as ``judge: {name: "examples.ruff_judge:RuffStyleJudge", style_weight: 0.1}``
(with the repository root on ``PYTHONPATH``), or register it for your package through the
``agentopd.judges`` entry-point group:

    [project.entry-points."agentopd.judges"]
    ruff-style = "examples.ruff_judge:RuffStyleJudge"

The score is ``(1 - style_weight) * tests + style_weight * (no ruff findings)``; the status stays
the test judge's (style never turns a failing program into a pass), and the critique gets the
first few ruff findings appended.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from agentopd.judges import BaseJudge, make_judge
from agentopd.judges.tests import extract_code
from agentopd.types import Judgement, Problem, Verdict


def ruff_findings(code: str, select: str = "E,F,W,B", limit: int = 3) -> list[str]:
    """Ruff's findings on ``code`` (read from stdin; nothing is executed)."""
    ruff = shutil.which("ruff") or sys.executable.replace("python", "ruff")
    r = subprocess.run([ruff, "check", "--quiet", "--no-cache", "--output-format", "json", "--select", select,
                        "--stdin-filename", "answer.py", "-"], input=code, capture_output=True, text=True, timeout=30)
    items = json.loads(r.stdout or "[]")
    return [f"line {i['location']['row']}: {i['code']} {i['message']}" for i in items][:limit]


class RuffStyleJudge(BaseJudge):
    def __init__(self, style_weight: float = 0.1, select: str = "E,F,W,B", **test_judge_kwargs):
        self.tests = make_judge("tests", **test_judge_kwargs)
        self.style_weight = style_weight
        self.select = select

    def judge(self, problem: Problem, response: str) -> Judgement:
        base = self.tests.judge(problem, response)
        v = base.verdict
        code = extract_code(response)
        if v.status in ("judge_error", "format_error") or code is None:
            return base
        findings = ruff_findings(code, self.select)
        score = (1 - self.style_weight) * v.score + self.style_weight * (not findings)
        critique = base.critique
        if findings:
            critique += "\nStyle (ruff):\n" + "\n".join(f"  {f}" for f in findings)
        return Judgement(Verdict(score, v.passed, v.total, v.status, v.details), critique)

    def close(self):
        self.tests.close()

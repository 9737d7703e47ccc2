"""Decoding speed of the ``hf`` engine against transformers' own ``model.generate`` on the same batch.

Tiny Llamas built from a config (``agentopd.testbed.tiny.build_tiny``: h64 l2, and h256 l4), 32 chat prompts
of varying lengths x ``n=4`` samples, ``max_new_tokens`` new tokens at temperature 1 (top-p 1), in
batches of ``batch_size`` rows (left-padded, KV cache) on both sides: ``HFEngine.generate`` (which
also returns each token's sampling log-prob) and ``model.generate(do_sample=True, ...)`` with scores
off, fed the same left-padded row batches; once without and once with stop strings (``STOP``;
``model.generate(stop_strings=..., tokenizer=...)`` on the other side). Tokens/s = generated tokens (each row up to and including
its first eos) / wall seconds; median of ``--reps`` timed runs after one warm-up, both arms
interleaved in one process with torch's thread count fixed.

    python bench/engine_speed.py [--label before|after] [--out bench/results/engine_speed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

STOP = ["</answer>", "\nUser:"]  # stop strings (both arms): rarely hit by a random tiny model


def prompts_for(tok, k: int) -> list[list[int]]:
    from agentopd.inference.base import apply_chat

    out = []
    for i in range(k):
        q = f"What is {7 * i + 3} + {13 * i % 50}?" + " Show your work." * (i % 4)
        out.append(apply_chat(tok, [{"role": "user", "content": q}]))
    return out


def count_tokens(new_BT: torch.Tensor, eos: set[int]) -> int:
    total = 0
    for row in new_BT.tolist():
        k = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        total += k
    return total


def bench_model(name, model, tok, prompts, n, max_new, batch_size, reps, stop=None):
    from agentopd.inference.hf import HFEngine
    from agentopd.rl.logprobs import pad_left

    eng = HFEngine(model, tok, batch_size=batch_size)
    rows = [p for p in prompts for _ in range(n)]

    def run_engine(seed):
        t = time.perf_counter()
        out = eng.generate(prompts, n=n, max_new_tokens=max_new, temperature=1.0, seed=seed,
                           stop=stop)
        dt = time.perf_counter() - t
        return sum(len(g.response_ids) for gs in out for g in gs), dt

    def run_hf(seed):
        torch.manual_seed(seed)
        toks, t = 0, time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(rows), batch_size):
                ids, mask = pad_left(rows[s:s + batch_size], eng.pad_id, eng.device)
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                     top_p=1.0, top_k=0, max_new_tokens=max_new, pad_token_id=eng.pad_id,
                                     output_scores=False, return_dict_in_generate=False,
                                     **({"stop_strings": stop, "tokenizer": tok} if stop else {}))
                toks += count_tokens(out[:, ids.shape[1]:], eng.eos_ids)
        return toks, time.perf_counter() - t

    run_engine(0), run_hf(0)  # warm-up
    res = {"engine": [], "model_generate": []}
    for r in range(reps):
        for arm, fn in (("engine", run_engine), ("model_generate", run_hf)):
            toks, dt = fn(r + 1)
            res[arm].append({"tokens": toks, "seconds": dt, "tokens_per_s": toks / dt})
    summary = {arm: {"median_tokens_per_s": statistics.median(x["tokens_per_s"] for x in v), "runs": v}
               for arm, v in res.items()}
    summary["engine_over_generate"] = (summary["engine"]["median_tokens_per_s"]
                                       / summary["model_generate"]["median_tokens_per_s"])
    print(f"{name}: engine {summary['engine']['median_tokens_per_s']:.0f} tok/s, model.generate "
          f"{summary['model_generate']['median_tokens_per_s']:.0f} tok/s, ratio {summary['engine_over_generate']:.2f}",
          flush=True)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="after")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "engine_speed.json"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from agentopd.testbed.tiny import build_tiny

    results = {}
    for name, kw in (("tiny h64 l2", {}), ("tiny h256 l4", {"hidden": 256, "layers": 4, "heads": 4})):
        model, tok = build_tiny(**kw)
        for stop in (None, STOP):
            key = name + (" stop strings" if stop else "")
            results[key] = bench_model(key, model, tok, prompts_for(tok, args.prompts), args.n,
                                       args.max_new_tokens, args.batch_size, args.reps, stop)
    doc = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            doc = json.load(f)
    doc[args.label] = {"settings": vars(args) | {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                                                  "transformers": __import__("transformers").__version__},
                       "results": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

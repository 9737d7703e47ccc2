"""Peak memory of top-K distillation: whole [B, T, V] logits vs logits formed chunk by chunk.

At a real vocabulary (151,936 tokens, Qwen2's), two small Qwen2 models built from a config (no
downloads; random weights, the student seeded 0 and the teacher 1), a batch like training's
(``--batch`` rows of ``--prompt-len`` prompt and ``--response-len`` response tokens, every response
position in the loss), one forward + backward of the top-K (K = 100) KL_alpha distillation loss
(alpha 0.5, token mean over the response positions), by two paths:

- full: the models' logits at the response positions, ``[B, R, V]`` (``logits_to_keep``, as the
  learner's ``response_logits``), the student's with grad and the teacher's without, then
  ``kl_alpha_topk_per_token``;
- chunked: the decoders' final hidden states at those positions and the LM heads, then
  ``kl_alpha_topk_chunked_per_token`` (the logits formed ``--chunk`` positions at a time and
  recomputed in backward).

Each path runs in its own fresh subprocess, so the peaks do not mix, with glibc's mmap threshold
fixed at 64 KiB (every allocation of 64 KiB or more is its own mmap, unmapped on free, so RSS
follows live memory). Measured there, for the first forward + backward after the models and inputs
are built: the peak RSS during it (VmHWM, reset through /proc/self/clear_refs just before it,
where the kernel allows) minus the RSS just before it, its wall time, and the loss (the two paths
must agree). Reported: ``ratio = chunked / full`` of that peak increase, against the target
(chunked <= 0.25x full), printed and written as JSON; never asserted. The same figures for a
second forward + backward in the same process (the first's gradients freed; libraries' code and
one-time initialisation already paid) are reported beside them.

    python bench/topk_memory.py      # about a minute on 2 cores; writes bench/results/topk_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's agentopd, wherever it is run from
TARGET = 0.25  # chunked peak increase <= 0.25x the full-logits path's (reported, never asserted)
ARMS = ("full", "chunked")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def build(args, seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 128), tie_word_embeddings=True,
                         max_position_embeddings=args.prompt_len + args.response_len)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def loss_full(student, teacher, ids_BT, R: int, args):
    """Top-K KL from the models' ``[B, R, V]`` logits at the response positions."""
    import torch

    from agentopd.rl import losses

    student_BRV = student(input_ids=ids_BT, logits_to_keep=R + 1).logits[:, :-1]
    with torch.no_grad():
        teacher_BRV = teacher(input_ids=ids_BT, logits_to_keep=R + 1).logits[:, :-1]
    per_token_BR = losses.kl_alpha_topk_per_token(student_BRV, teacher_BRV, args.alpha, args.k)
    return per_token_BR.mean()


def loss_chunked(student, teacher, ids_BT, R: int, args):
    """Top-K KL from the decoders' final hidden states and the LM heads, chunk by chunk."""
    import torch

    from agentopd.rl import losses

    def response_hidden(model):  # the positions whose logits predict the response tokens
        return model.get_decoder()(input_ids=ids_BT).last_hidden_state[:, -R - 1:-1]

    student_BRH = response_hidden(student)
    with torch.no_grad():
        teacher_BRH = response_hidden(teacher)
    mask_BR = torch.ones(student_BRH.shape[:2], dtype=torch.bool)
    per_token_BR = losses.kl_alpha_topk_chunked_per_token(
        student_BRH, teacher_BRH, student.get_output_embeddings().weight, mask_BR, args.alpha, args.k, args.chunk,
        teacher.get_output_embeddings().weight)
    return per_token_BR.mean()


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (``5`` into /proc/self/clear_refs), where the kernel allows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def one_pass(fn, student, teacher, ids_BT, args) -> dict:
    """One forward + backward from a clean state (no gradients held): its peak RSS increase."""
    import gc

    student.zero_grad(set_to_none=True)
    gc.collect()
    hwm_reset = _reset_hwm()
    rss_before, hwm_before = _status_bytes("VmRSS"), _status_bytes("VmHWM")
    t0 = time.perf_counter()
    loss = fn(student, teacher, ids_BT, args.response_len, args)
    loss.backward()
    seconds = time.perf_counter() - t0
    hwm = _status_bytes("VmHWM")
    return {"peak_increase_bytes": hwm - rss_before, "seconds": round(seconds, 3), "loss": loss.item(),
            "head_grad_norm": student.get_output_embeddings().weight.grad.norm().item(),
            "rss_before_bytes": rss_before, "hwm_before_bytes": hwm_before, "hwm_bytes": hwm, "hwm_reset": hwm_reset}


def run_arm(arm: str, args) -> dict:
    """In a fresh process: build the models and inputs, then two forward + backward passes of
    ``arm``: ``first`` (the measure: nothing run before it) and ``second`` (code paths already
    loaded, the first pass's gradients freed)."""
    import torch

    student, teacher = build(args, 0), build(args, 1).requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    ids_BT = torch.randint(args.vocab, (args.batch, args.prompt_len + args.response_len), generator=gen)
    fn = loss_full if arm == "full" else loss_chunked
    first = one_pass(fn, student, teacher, ids_BT, args)
    second = one_pass(fn, student, teacher, ids_BT, args)
    return {"arm": arm, "first": first, "second": second, "torch_threads": torch.get_num_threads()}


def measure(arm: str, args, argv: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_arm", arm]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{arm} arm failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=128)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "topk_memory.json"))
    ap.add_argument("--_arm", choices=ARMS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._arm:
        print(json.dumps(run_arm(args._arm, args)))
        return 0

    import torch

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "_arm")}
    print(f"topk_memory: {json.dumps(settings)}", flush=True)
    arms = {}
    for arm in ARMS:
        arms[arm] = measure(arm, args, argv)
        for name in ("first", "second"):
            r = arms[arm][name]
            print(f"  {arm:<8} {name:<6} pass: peak +{r['peak_increase_bytes'] / 2**20:8.1f} MiB  {r['seconds']:7.2f} s  "
                  f"loss {r['loss']:.6f}  (RSS before {r['rss_before_bytes'] / 2**20:.0f} MiB, "
                  f"VmHWM reset: {r['hwm_reset']})", flush=True)
    ratios = {name: arms["chunked"][name]["peak_increase_bytes"] / arms["full"][name]["peak_increase_bytes"]
              for name in ("first", "second")}
    ratio = ratios["first"]
    btrv = args.batch * args.response_len * args.vocab * 4
    print(f"  one float32 [B, R, V] tensor: {btrv / 2**20:.0f} MiB")
    print(f"  ratio = chunked / full peak increase, first pass: {ratio:.3f} (target <= {TARGET}: "
          f"{'met' if ratio <= TARGET else 'not met'}); second pass: {ratios['second']:.3f}")
    report = {"settings": settings, "arms": arms, "ratio": ratio, "ratio_second_pass": ratios["second"],
              "target": TARGET, "target_met": ratio <= TARGET,
              "loss_abs_diff": abs(arms["full"]["first"]["loss"] - arms["chunked"]["first"]["loss"]),
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "platform": platform.platform(), "cpu_count": os.cpu_count(),
                              "loadavg": os.getloadavg()},
              "method": "fresh subprocess per arm, MALLOC_MMAP_THRESHOLD_=65536; peak increase = VmHWM during one "
                        "forward+backward (reset just before it) - VmRSS just before it; ratio: the first pass (right "
                        "after the models and inputs are built), ratio_second_pass: a second one in the same process "
                        "(the first's gradients freed)"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Step cost: what the self-teacher adds to a training step, and what full-vocabulary KL costs.

One run measures, on this machine and against baselines measured in the same run:

1. The train loop (``agentopd.train.train``) on the micro setting (``SETTING``: the tiny model,
   generated arithmetic, the math judge; what ``configs/micro-sdpo.yaml`` held when the first
   figures were taken, pinned here so that edits of that config do not move them): seconds per stage (generate / execute /
   score / update, from the ``time_*`` metrics, mean over the steps after the warm-up ones) with
   ``algo.advantage=grpo`` (no self-teacher forward) and ``algo.advantage=sd_token`` (SDPO: the
   teacher re-scores every response under its critique context). The self-teacher's overhead is
   the ratio SDPO step / GRPO step, where a step is the sum of the four stages. Runs are
   interleaved (GRPO, SDPO, SDPO, GRPO in a full run) so that a change of machine load hits both.
   Also on a bigger tiny model (hidden 256, 4 layers; saved with ``build_tiny(dirpath=...)`` and
   loaded through ``model.path``), so that the ratio is less dominated by Python overhead.
2. Full-vocabulary KL_alpha (alpha 0.5, the generalized JSD) forward+backward from hidden states
   ``[B, T, H]`` and an lm-head weight ``[V, H]`` (gradients to both): ``kl_alpha`` on materialized
   ``[B, T, V]`` logits (the baseline), ``kl_alpha_chunked`` (default chunk, and smaller chunks),
   and ``kl_alpha_topk(k=100)``; median seconds, ratio against the baseline.
3. Peak memory of the same forward+backward at V = 32768: peak bytes of live torch storages,
   counted by a TorchDispatchMode that sees every op (forward, backward and checkpoint
   recomputation) and adds each new output storage's bytes, with a weakref finalizer on the storage
   that subtracts them when the storage is freed. Inputs are not counted; gradients are. Scratch
   buffers that a kernel allocates and frees inside one op are not seen. In a full run it is
   cross-checked by the RSS high-water mark (VmHWM, reset after a warm-up run) of a fresh
   subprocess per method, above its RSS just before the forward+backward, with glibc's mmap
   threshold fixed at 64 KiB so that freed tensors go back to the OS. (``tracemalloc`` does not
   see torch's allocations; ``ru_maxrss`` carries the parent's peak over fork+exec.)
4. A distillation loss in the train loop (SDPO with ``algo.distill_weight=1``): the update stage's
   seconds with top-K (k=100) KL, full-vocabulary KL with the logits formed chunk by chunk from the
   final hidden states (``optim.logits_chunk=128``, the default) and with whole ``[B, R, V]``
   logits (``optim.logits_chunk=0``); on the tiny model only in a quick run.

5. The thread policy (``agentopd.threads``): the same train loop (the micro setting, SDPO, math
   judge workers beside torch), each run in a fresh process, with the policy off
   (``AGENTOPD_THREAD_POLICY=off``: torch's and OpenMP's defaults, pools of ``os.cpu_count()``)
   and on (threads and pools from the cores the process may use, OpenMP's threads waiting
   passively on a small machine), alone and beside another busy torch process (torch's defaults,
   a loop of small matmuls, as a second training job on the same cores); before/after alternate.
   Mean step seconds over the steps after the warm-up ones, ratio before / after. ``--skip-threads``
   leaves it out.

Targets are printed (met: yes/no), never asserted:

- an SDPO step costs <= 1.5x a GRPO step;
- chunked full-vocabulary KL peaks at <= 0.25x the naive one's memory (V >= 32k).

    python bench/step_cost.py            # full run (a few minutes on 2 cores)
    python bench/step_cost.py --quick    # a smoke run (under 3 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
SETTING = ["model.path=tiny", "env.id=agentopd/Math-v0", "env.kwargs.problems=arithmetic", "env.kwargs.n=256", "env.kwargs.levels=[1, 2]",
           "sampling.group_size=4", "sampling.prompts_per_step=4", "sampling.max_new_tokens=24",
           "teacher.mode=ema", "teacher.tau=0.05", "algo.advantage=sd_token", "algo.advantage_kwargs={clamp: 5.0}",
           "optim.lr=0.0001", "optim.micro_batch=8"]
STAGES = ("generate", "execute", "score", "update")
ALPHA = 0.5  # algo.distill_alpha's default: the generalized JSD, the costliest form

TARGETS = {  # reported against, never asserted
    "sdpo_over_grpo_step": 1.5,  # an SDPO step costs <= 1.5x a GRPO step
    "chunked_over_naive_peak": 0.25,  # chunked full-vocab KL peak <= 0.25x the naive one (V >= 32k)
}


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def yes_no(ok: bool) -> str:
    return "yes" if ok else "no"


# ------------------------------------------------------------------ 1. the train loop


def train_run(algo: str, model_path: str, steps: int, out_root: str, extra: tuple[str, ...] = ()) -> list[dict]:
    """One ``train`` run of the micro setting (``extra``: more config overrides); returns its metrics rows."""
    from agentopd.config import load
    from agentopd.train import train

    out = tempfile.mkdtemp(prefix=f"{algo}-", dir=out_root)
    overrides = ["run.progress=false", f"run.out={out}", f"run.steps={steps}", "run.checkpoint_every=0",
                 f"model.path={model_path}"]
    if algo == "grpo":
        overrides += ["algo.advantage=grpo", "algo.advantage_kwargs={}"]
    else:
        overrides += [f"algo.advantage={algo}"]  # keeps SETTING's advantage_kwargs (clamp: 5.0)
    return train(load(None, SETTING + overrides + list(extra)))


def bench_train(models: list[tuple[str, str]], steps: int, warmup: int, order: list[str], out_root: str) -> list[dict]:
    results = []
    for label, path in models:
        kept: dict[str, list[dict]] = {a: [] for a in dict.fromkeys(order)}
        runs = []
        for algo in order:
            t0 = time.perf_counter()
            rows = train_run(algo, path, steps, out_root)
            runs.append({"algo": algo, "wall_s": round(time.perf_counter() - t0, 2), "loadavg_after": loadavg(),
                         "steps": [{k: v for k, v in r.items() if k.startswith("time_") or k in
                                    ("step", "response_len", "teacher_signal_frac")} for r in rows]})
            kept[algo] += rows[warmup:]
            print(f"  [{label}] {algo}: {len(rows)} steps in {runs[-1]['wall_s']:.1f} s "
                  f"(load {runs[-1]['loadavg_after']})", flush=True)
        per_algo = {}
        for algo, rows in kept.items():
            stage = {s: statistics.fmean(r[f"time_{s}"] for r in rows) for s in STAGES}
            step_s = [sum(r[f"time_{s}"] for s in STAGES) for r in rows]
            per_algo[algo] = {"n_steps": len(rows), **{f"{s}_s": v for s, v in stage.items()},
                              "step_s": statistics.fmean(step_s), "step_median_s": statistics.median(step_s),
                              "response_len": statistics.fmean(r["response_len"] for r in rows),
                              "teacher_signal_frac": statistics.fmean(r["teacher_signal_frac"] for r in rows)}
        base = per_algo["grpo"]
        for algo, m in per_algo.items():
            m["ratio_step"] = m["step_s"] / base["step_s"]
            m["ratio_step_median"] = m["step_median_s"] / base["step_median_s"]
            # only the score stage's difference (the self-teacher forward) on top of the GRPO step:
            # less noisy than the whole-step ratio, whose other stages do the same work in both
            m["ratio_score_only"] = 1 + (m["score_s"] - base["score_s"]) / base["step_s"]
        results.append({"model": label, "model_path": path, "runs": runs, "per_algo": per_algo,
                        "sdpo_over_grpo": per_algo["sd_token"]["ratio_step"],
                        "target_met": per_algo["sd_token"]["ratio_step"] <= TARGETS["sdpo_over_grpo_step"]})
    return results


# distillation as a loss (SDPO + algo.distill_weight=1) in the train loop: label -> overrides
DISTILL = {"top-K k=100": ("algo.distill_topk=100",),
           "full, chunked (default)": ("algo.distill_topk=0",),
           "full, [B,R,V] logits": ("algo.distill_topk=0", "optim.logits_chunk=0")}


def bench_distill(models: list[tuple[str, str]], steps: int, warmup: int, out_root: str) -> list[dict]:
    """The update stage (and the whole step) of SDPO with a distillation loss, per DISTILL variant."""
    results = []
    for label, path in models:
        per = {}
        for name, extra in DISTILL.items():
            rows = train_run("sd_token", path, steps, out_root, ("algo.distill_weight=1.0", *extra))[warmup:]
            per[name] = {"update_s": statistics.fmean(r["time_update"] for r in rows),
                         "step_s": statistics.fmean(sum(r[f"time_{s}"] for s in STAGES) for r in rows),
                         "distill_loss": statistics.fmean(r["distill_loss"] for r in rows)}
            print(f"  [{label}] {name}: update {per[name]['update_s']:.3f} s", flush=True)
        base = per["top-K k=100"]
        for m in per.values():
            m["update_over_topk"] = m["update_s"] / base["update_s"]
        results.append({"model": label, "per_variant": per})
    return results


# ------------------------------------------------------------------ 2./3. full-vocabulary KL


def make_inputs(B: int, T: int, H: int, V: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student_BTH = torch.randn(B, T, H, generator=g).requires_grad_(True)
    teacher_BTH = torch.randn(B, T, H, generator=g)
    weight_VH = (torch.randn(V, H, generator=g) * H ** -0.5).requires_grad_(True)
    mask_BT = torch.ones(B, T)
    return student_BTH, teacher_BTH, weight_VH, mask_BT


def kl_methods(N: int) -> dict:
    """name -> fn(student_BTH, teacher_BTH, weight_VH, mask_BT) returning the scalar loss. N: the
    number of masked positions (chunk 1024 is starred when it is a single chunk; the default is 128)."""
    from agentopd.rl import losses

    def naive(s, t, w, m):
        return losses.kl_alpha(s @ w.T, t @ w.detach().T, m, ALPHA)

    def chunked(chunk):
        return lambda s, t, w, m: losses.kl_alpha_chunked(s, t, w, m, ALPHA, chunk=chunk)

    def topk(s, t, w, m):
        return losses.kl_alpha_topk(s @ w.T, t @ w.detach().T, m, ALPHA, 100)

    return {"naive [B,T,V] logits": naive,
            "chunked 1024" + (" *" if N <= 1024 else ""): chunked(1024),
            "chunked 256": chunked(256),
            "chunked 128 (default)": chunked(128),
            "topk k=100": topk}


def fwd_bwd(fn, inputs) -> None:
    s, t, w, m = inputs
    s.grad, w.grad = None, None
    fn(s, t, w, m).backward()


def bench_kl_time(B: int, T: int, H: int, V: int, reps: int) -> dict:
    inputs = make_inputs(B, T, H, V)
    out = {}
    for name, fn in kl_methods(B * T).items():
        fwd_bwd(fn, inputs)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fwd_bwd(fn, inputs)
            times.append(time.perf_counter() - t0)
        out[name] = {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}
    base = out[next(iter(out))]["median_s"]
    for m in out.values():
        m["ratio"] = m["median_s"] / base
    return out


class LiveStorageBytes(TorchDispatchMode):
    """Peak bytes of live torch storages created under the mode. Every op's outputs are looked at:
    a storage not seen before (and not one of the op's inputs' storages: views, in-place ops) is
    counted with its ``nbytes()`` and gets a weakref finalizer that uncounts it when the storage
    is freed (torch keeps one Python object per live storage, so the finalizer fires when the
    storage itself dies, not when a Python wrapper does)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.allocated = 0
        self.count = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {id(x.untyped_storage()) for x in pytree.tree_leaves((args, kwargs))
               if isinstance(x, torch.Tensor) and x.layout == torch.strided}
        for x in pytree.tree_leaves(out):
            if not isinstance(x, torch.Tensor) or x.layout != torch.strided:
                continue
            st = x.untyped_storage()
            key = id(st)
            if key in ins or key in self._seen:
                continue
            nbytes = st.nbytes()
            self._seen.add(key)
            weakref.finalize(st, self._free, key, nbytes)
            self.live += nbytes
            self.allocated += nbytes
            self.count += 1
            self.peak = max(self.peak, self.live)
        return out


def measure_peak_tracked(fn, inputs) -> dict:
    s, t, w, m = inputs
    s.grad, w.grad = None, None
    mode = LiveStorageBytes()
    with mode:
        loss = fn(s, t, w, m)
        fwd_peak, after_fwd = mode.peak, mode.live
        loss.backward()
        del loss
    return {"peak_bytes": mode.peak, "forward_peak_bytes": fwd_peak, "live_after_forward_bytes": after_fwd,
            "live_after_backward_bytes": mode.live, "allocated_bytes": mode.allocated, "storages": mode.count}


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    return 0


def _rss_child(method_index: int, B: int, T: int, H: int, V: int) -> None:
    """In a fresh process: the RSS high-water mark (VmHWM) during one forward+backward above the RSS
    just before it; JSON on stdout. VmHWM is reset first (``5`` into /proc/self/clear_refs) where
    the kernel allows; ru_maxrss is not used (it carries the parent's peak over fork+exec)."""
    inputs = make_inputs(B, T, H, V)
    fn = list(kl_methods(B * T).values())[method_index]
    fwd_bwd(fn, inputs)  # warm-up: first-use code pages and lazy inits would count as RSS otherwise
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before, hwm_before = _proc_status_bytes("VmRSS"), _proc_status_bytes("VmHWM")
    fwd_bwd(fn, inputs)
    hwm = _proc_status_bytes("VmHWM")
    print(json.dumps({"rss_before_bytes": before, "hwm_before_bytes": hwm_before, "hwm_reset": reset,
                      "hwm_bytes": hwm, "peak_delta_bytes": hwm - before}))


def measure_peak_rss(method_index: int, B: int, T: int, H: int, V: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_rss-child", str(method_index), str(B), str(T), str(H), str(V)]
    # a fixed mmap threshold: every allocation of 64 KiB or more is its own mmap, unmapped on free, so
    # RSS follows live bytes (by default glibc raises the threshold and keeps freed heap memory)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_kl_memory(B: int, T: int, H: int, V: int, rss: bool) -> dict:
    inputs = make_inputs(B, T, H, V)
    out = {}
    for i, (name, fn) in enumerate(kl_methods(B * T).items()):
        out[name] = measure_peak_tracked(fn, inputs)
        if rss:
            out[name]["rss"] = measure_peak_rss(i, B, T, H, V)
    base = out[next(iter(out))]
    for m in out.values():
        m["ratio"] = m["peak_bytes"] / base["peak_bytes"]
        if rss and "peak_delta_bytes" in m["rss"] and "peak_delta_bytes" in base["rss"]:
            m["rss"]["ratio"] = m["rss"]["peak_delta_bytes"] / base["rss"]["peak_delta_bytes"]
    return out


# ------------------------------------------------------------------ report


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def print_train(results: list[dict], warmup: int) -> None:
    print("\n== 1. Self-teacher overhead: train loop on the micro setting "
          f"(s per stage, mean over steps after {warmup} warm-up) ==")
    print(f"{'model':<20} {'algo':<9} {'steps':>5} {'generate':>9} {'execute':>8} {'score':>8} {'update':>8} "
          f"{'step':>8} {'x grpo':>7} {'median':>7} {'score-only':>10} {'resp len':>8}")
    for r in results:
        for algo, m in r["per_algo"].items():
            print(f"{r['model']:<20} {algo:<9} {m['n_steps']:>5} {m['generate_s']:>9.3f} {m['execute_s']:>8.3f} "
                  f"{m['score_s']:>8.3f} {m['update_s']:>8.3f} {m['step_s']:>8.3f} {m['ratio_step']:>7.2f} "
                  f"{m['ratio_step_median']:>7.2f} {m['ratio_score_only']:>10.2f} {m['response_len']:>8.1f}")
    print("  step = generate + execute + score + update (advantages, metrics, checkpoints untimed). score: the "
          "student's old log-probs\n  (both) + the self-teacher forward (sd_token only). Both keep and EMA-update "
          "the teacher copy (train does so for every estimator).\n  x grpo: mean step / GRPO mean step "
          "(the target); median: the same with medians; score-only: 1 + (score - GRPO score) / GRPO step.")
    for r in results:
        print(f"  target: SDPO step <= {TARGETS['sdpo_over_grpo_step']}x GRPO step [{r['model']}]: "
              f"{r['sdpo_over_grpo']:.2f}x -> target met: {yes_no(r['target_met'])}")


def print_distill(results: list[dict], warmup: int) -> None:
    print("\n== 4. Distillation loss in the train loop: SDPO + algo.distill_weight=1, alpha 0.5 "
          f"(s, mean over steps after {warmup} warm-up) ==")
    print(f"{'model':<20} {'distillation':<24} {'update':>8} {'x top-K':>8} {'step':>8}")
    for r in results:
        for name, m in r["per_variant"].items():
            print(f"{r['model']:<20} {name:<24} {m['update_s']:>8.3f} {m['update_over_topk']:>8.2f} {m['step_s']:>8.3f}")
    print("  full, chunked: optim.logits_chunk=128, the logits formed from the final hidden states 128 positions at a "
          "time in the\n  update (policy log-probs and KL, recomputed in backward); [B,R,V] logits: "
          "optim.logits_chunk=0. The tiny models' vocabulary: V = 512.")


def print_kl_time(kl_time: dict, B: int, T: int, H: int) -> None:
    print(f"\n== 2. Full-vocabulary KL_alpha (alpha={ALPHA}) forward+backward, B={B} T={T} H={H} "
          "(median s; ratio vs naive) ==")
    print(f"{'V':>6}  {'method':<25} {'median s':>9} {'min s':>8} {'x naive':>8}")
    for V, res in kl_time.items():
        for name, m in res.items():
            print(f"{V:>6}  {name:<25} {m['median_s']:>9.3f} {m['min_s']:>8.3f} {m['ratio']:>8.2f}")
    print("  every method starts from hidden states and the lm-head weight (the logits matmul is included); "
          "gradients flow to both.\n  naive and topk materialize [B,T,V] logits; * chunk 1024 "
          f"holds all B*T = {B * T} positions: one chunk.")


def print_kl_memory(mem: dict, B: int, T: int, H: int, V: int, rss: bool) -> list[dict]:
    print(f"\n== 3. Peak memory of full-vocabulary KL_alpha forward+backward, V={V} B={B} T={T} H={H} ==")
    print("  method: a TorchDispatchMode sees every aten op (forward, backward, checkpoint recompute) and sums the "
          "bytes of each new\n  output storage while it lives (weakref finalizer on the storage subtracts them on "
          "free); inputs not counted, grads counted.")
    if rss:
        print("  cross-check: RSS high-water mark (VmHWM, reset after a warm-up) of a fresh subprocess per method "
              "(MALLOC_MMAP_THRESHOLD_=65536,\n  so freed memory goes back to the OS) minus its RSS just before the "
              "forward+backward.")
    btv = B * T * V * 4  # one float32 [B, T, V] tensor
    hdr = f"{'method':<25} {'peak MiB':>9} {'fwd peak':>9} {'x [B,T,V]':>9} {'x naive':>8}"
    if rss:
        hdr += f" {'RSS MiB':>9} {'x naive':>8}"
    print(hdr)
    for name, m in mem.items():
        line = (f"{name:<25} {mib(m['peak_bytes']):>9} {mib(m['forward_peak_bytes']):>9} "
                f"{m['peak_bytes'] / btv:>9.2f} {m['ratio']:>8.3f}")
        if rss:
            r = m["rss"]
            line += (f" {mib(r['peak_delta_bytes']):>9} {r.get('ratio', float('nan')):>8.3f}"
                     if "peak_delta_bytes" in r else "   (error)")
        print(line)
    verdicts = []
    for name, m in mem.items():
        if name.startswith("chunked"):
            ok = m["ratio"] <= TARGETS["chunked_over_naive_peak"]
            verdicts.append({"method": name, "ratio": m["ratio"], "target_met": ok})
            print(f"  target: chunked peak <= {TARGETS['chunked_over_naive_peak']}x naive [{name}]: "
                  f"{m['ratio']:.3f}x -> target met: {yes_no(ok)}")
    print(f"  x [B,T,V]: peak in units of one float32 [B,T,V] tensor ({btv / 2**20:.0f} MiB); "
          "* chunk 1024 is one chunk here (B*T = 1024 positions).")
    return verdicts


# ------------------------------------------------------------------ 5. the thread policy

# another torch process on the same cores, with torch's defaults (as a second training job)
RIVAL = "import torch\na = torch.randn(192, 192)\nwhile True:\n    a = torch.tanh(a @ a)\n"
_THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")


def _thread_child(steps: int) -> None:
    """In a fresh process whose environment the parent set: the policy's torch threads (as
    ``train`` sets them), then the train loop; JSON on stdout."""
    from agentopd import threads

    threads.configure_torch()
    with tempfile.TemporaryDirectory(prefix="threads-") as tmp:
        rows = train_run("sd_token", "tiny", steps, tmp)
    print(json.dumps({"torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                      "step_s": [sum(r[f"time_{s}"] for s in STAGES) for r in rows]}))


def thread_run(policy: bool, rival: bool, steps: int) -> dict:
    from agentopd import threads

    base = {k: v for k, v in os.environ.items() if k not in _THREAD_ENV and k != threads.ENV_SWITCH}
    env = dict(base)
    if policy:
        threads.configure_env(env)  # what the agentopd command does before torch loads
    else:
        env[threads.ENV_SWITCH] = "off"
    other = subprocess.Popen([sys.executable, "-c", RIVAL], env=base) if rival else None
    try:
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--_thread-child", str(steps)], env=env,
                             capture_output=True, text=True, timeout=1200, check=False)
    finally:
        if other is not None:
            other.kill()
            other.wait()
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-1000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_threads(steps: int, warmup: int, repeats: int) -> dict:
    """Mean step seconds (after ``warmup``) per condition and policy; before/after alternate."""
    out = {}
    for cond, rival in (("alone", False), ("beside a busy torch process", True)):
        kept = {"before": [], "after": []}
        runs = []
        for i in range(repeats):
            for arm in (("before", "after") if i % 2 == 0 else ("after", "before")):
                r = thread_run(arm == "after", rival, steps)
                runs.append({"arm": arm, **r})
                if "error" in r:
                    print(f"  [{cond}] {arm}: error {r['error'][-300:]}", flush=True)
                    continue
                kept[arm] += r["step_s"][warmup:]
                print(f"  [{cond}] {arm}: {statistics.fmean(r['step_s'][warmup:]):.3f} s/step, "
                      f"{r['torch_threads']} torch threads, OMP_WAIT_POLICY={r['omp_wait_policy']} "
                      f"(load {loadavg()})", flush=True)
        per = {a: {"step_s": statistics.fmean(v), "step_median_s": statistics.median(v), "n_steps": len(v)}
               for a, v in kept.items() if v}
        if len(per) == 2:
            per["before_over_after"] = per["before"]["step_s"] / per["after"]["step_s"]
        out[cond] = {**per, "runs": runs}
    return out


def print_threads(res: dict, warmup: int) -> None:
    from agentopd.threads import SMALL_MACHINE

    print(f"\n== 5. Thread policy: train loop on the micro setting, SDPO (s/step, mean over steps after {warmup} "
          "warm-up) ==")
    print(f"{'condition':<30} {'before':>8} {'after':>8} {'before/after':>12}")
    for cond, m in res.items():
        if "before_over_after" in m:
            print(f"{cond:<30} {m['before']['step_s']:>8.3f} {m['after']['step_s']:>8.3f} "
                  f"{m['before_over_after']:>12.2f}")
    print("  before: AGENTOPD_THREAD_POLICY=off (torch's and OpenMP's defaults, pools of os.cpu_count()); after: "
          "agentopd.threads\n  (threads and pools from os.sched_getaffinity, OMP_WAIT_POLICY=PASSIVE on <= "
          f"{SMALL_MACHINE} cores). The rival: another torch process, torch's defaults, small matmuls in a loop.")


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_rss-child":
        _rss_child(*map(int, sys.argv[2:7]))
        return 0
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_thread-child":
        _thread_child(int(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run (fewer steps, V=8192 for the KL timing)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "step_cost.json"), help="where to write JSON")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--skip-train", action="store_true", help="skip part 1 (the train loop)")
    ap.add_argument("--skip-threads", action="store_true", help="skip part 5 (the thread policy)")
    ap.add_argument("--only-threads", action="store_true", help="run part 5 (the thread policy) alone")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": loadavg(),
            "quick": args.quick}
    print(f"step_cost: torch {info['torch']}, {info['torch_threads']} torch threads, {info['cpu_count']} CPUs, "
          f"load average {info['loadavg_start']}, {'quick' if args.quick else 'full'} run", flush=True)

    # 1. train loop
    steps, warmup = (4, 1) if args.quick else (10, 2)
    thread_repeats = 1 if args.quick else 2
    if args.only_threads:
        print(f"\n[5] thread policy: before/after x {thread_repeats}, alone and beside a busy torch process", flush=True)
        res = bench_threads(steps, warmup, thread_repeats)
        print_threads(res, warmup)
        info["loadavg_end"], info["wall_s"] = loadavg(), round(time.perf_counter() - t_start, 1)
        write_json(args.json, {"info": info, "threads": {"steps": steps, "warmup_steps": warmup,
                                                          "repeats": thread_repeats, "results": res}})
        return 0
    order = ["grpo", "sd_token"] if args.quick else ["grpo", "sd_token", "sd_token", "grpo"] * 2
    train_results, distill_results = [], []
    if not args.skip_train:
        print("\n[1] train loop: " + ", ".join(order) + f" runs of {steps} steps per model", flush=True)
        with tempfile.TemporaryDirectory(prefix="step_cost-") as tmp:
            from transformers.utils import logging as hf_logging

            from agentopd.testbed.tiny import build_tiny

            hf_logging.disable_progress_bar()

            big = os.path.join(tmp, "tiny-h256-l4")
            build_tiny(dirpath=big, hidden=256, layers=4, heads=4, seed=0)
            models = [("tiny h64 l2", "tiny"), ("tiny h256 l4", big)]
            train_results = bench_train(models, steps, warmup, order, tmp)
            print(f"\n[4] distillation in the train loop: {', '.join(DISTILL)}", flush=True)
            distill_results = bench_distill(models[:1] if args.quick else models, steps, warmup, tmp)
            for r in train_results:
                r["model_path"] = "tiny" if r["model_path"] == "tiny" else "build_tiny(hidden=256, layers=4, heads=4)"

    thread_results = {}
    if not args.skip_threads:
        print(f"\n[5] thread policy: before/after x {thread_repeats}, alone and beside a busy torch process", flush=True)
        thread_results = bench_threads(steps, warmup, thread_repeats)

    # 2. KL time
    B, T, H = 4, 256, 256
    vocabs = [8192] if args.quick else [8192, 32768]
    reps = 2 if args.quick else 3
    print(f"\n[2] KL timing: V in {vocabs}, {reps} timed reps after 1 warm-up", flush=True)
    kl_time = {V: bench_kl_time(B, T, H, V, reps) for V in vocabs}

    # 3. KL memory at V = 32768
    V_mem = 32768
    rss = not args.quick
    print(f"\n[3] KL memory at V={V_mem}" + (" (+ RSS subprocesses)" if rss else ""), flush=True)
    kl_mem = bench_kl_memory(B, T, H, V_mem, rss)

    if train_results:
        print_train(train_results, warmup)
        print_distill(distill_results, warmup)
    print_kl_time(kl_time, B, T, H)
    mem_verdicts = print_kl_memory(kl_mem, B, T, H, V_mem, rss)
    if thread_results:
        print_threads(thread_results, warmup)

    info["loadavg_end"] = loadavg()
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(f"\nload average at end {info['loadavg_end']}; total {info['wall_s']:.0f} s")
    report = {"info": info, "targets": TARGETS,
              "train": {"setting": SETTING, "steps": steps, "warmup_steps": warmup, "order": order,
                        "step_definition": "time_generate + time_execute + time_score + time_update",
                        "results": train_results},
              "distill": {"variants": {k: list(v) for k, v in DISTILL.items()}, "results": distill_results},
              "kl_time": {"B": B, "T": T, "H": H, "alpha": ALPHA, "reps": reps,
                          "results": {str(V): res for V, res in kl_time.items()}},
              "kl_memory": {"B": B, "T": T, "H": H, "V": V_mem, "alpha": ALPHA,
                            "method": "TorchDispatchMode live-storage bytes (weakref finalizers on storages); "
                                      "inputs excluded, grads included" + ("; RSS cross-check" if rss else ""),
                            "results": kl_mem, "verdicts": mem_verdicts},
              "threads": {"steps": steps, "warmup_steps": warmup, "repeats": thread_repeats,
                          "results": thread_results}}
    write_json(args.json, report)
    return 0


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

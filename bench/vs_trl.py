"""agentopd train against TRL's own trainers: the same setting through each, side by side in one run.

Arms (each in its own fresh subprocess, one after the other, so that they never share the cores and
each one's peak RSS is its own):

- ``agentopd sdpo``: ``agentopd.train.train`` with ``algo.loss=sdpo_token`` (TRL's sampled-token
  form), ``algo.distill_alpha=1``;
- ``trl sdpo``: ``trl.experimental.sdpo.SDPOTrainer`` (``distillation_mode="sampled_token"``,
  ``distillation_alpha=1``, ``distillation_weight=1``);
- ``agentopd grpo``: ``algo.loss=pg``, ``algo.advantage=grpo`` (group std-normalised);
- ``trl grpo``: ``trl.GRPOTrainer`` (``scale_rewards="group"``, ``loss_type="dapo"``).

The same setting on every arm (``SETTING``, fixed before the first full run):

- the model: a Llama built from a config (``agentopd.testbed.tiny.build_tiny``: hidden 256,
  4 layers, 4 heads, seeded random weights, the tiny byte-level BPE tokenizer, V = 512), saved
  once and loaded from that directory by every arm (float32, CPU);
- the prompts: generated arithmetic (``env.kwargs.problems=arithmetic``, levels 1-2, 256 problems), in
  the order ``agentopd train`` draws them; TRL gets them in that order with ``shuffle_dataset=False``
  (the bench checks that both sides saw the same prompts, step by step);
- 8 prompts x 4 samples (group size) = 32 generations per step, at most 32 new tokens, temperature
  1.0, top-p 1, no top-k;
- the reward (a plain deterministic Python function, ``reward``): 1 if the completion contains the
  last digit of the answer, else 0 (about 40 % of a random model's samples; most groups have a
  success, so both SDPO arms have demonstrations to distil from). A reward of 1 is a success.
- AdamW, lr 1e-4 constant, no weight decay, gradient clip 1.0; one optimizer step per batch of
  rollouts, the whole batch of 32 in one forward/backward (no gradient accumulation);
- no reference model (``beta=0`` / ``algo.ref_kl=0``); EMA teacher, rate 0.05, synced every step;
- the teacher context: the prompt plus the first *other* successful sample of the group as the
  demonstration (TRL's ``use_successful_as_teacher``, ``dont_reprompt_on_self_success``; agentopd's
  ``teacher.context=[demonstration]``, ``self_demonstration=false``), no environment feedback
  (TRL's ``include_environment_feedback=False``; no ``feedback`` in agentopd's ``teacher.context``); both
  templates are lasgroup/SDPO's reprompt (prompt, "Correct solution:", the demonstration, "Correctly
  solve the original question.").
- the same number of torch threads (``--threads``, default 1) on every arm.

What each side computes per step (read from the code of both):

- TRL SDPO: ``model.generate`` (32 samples; no log-probs kept), the reward, then one student
  forward+backward and one teacher forward over all 32 rows (rows with no demonstration are
  forwarded under the plain prompt and masked out of the loss), an AdamW step and the EMA sync of
  the teacher copy. With one generation per optimizer step TRL computes no old log-probs, so its
  importance-ratio clip (``distillation_is_clip``) is never applied (the ratio is 1 on-policy).
- agentopd SDPO: the ``hf`` engine (32 samples with their exact sampling log-probs), the reward,
  then a no-grad teacher forward over the rows *with* a demonstration only, one student
  forward+backward over those rows (the old log-probs, for the importance ratio and the rollout
  correction, are that forward's own, detached: the model has not moved since sampling) and a
  no-grad student forward over the other rows (their loss weight is 0; their old log-probs feed
  the rollout metrics), an AdamW step and the EMA update: no teacher forward and no backward on
  rows without a signal. In each of these forwards, rows that repeat a prompt (a group's 4 student
  rows share theirs; most of a group's teacher contexts share their demonstration) forward it once,
  its KV cache repeated to the rows, then the responses on it (``shared_prefix_hidden``: the same
  log-probs and gradients up to float rounding); TRL forwards every row's prompt.
- TRL GRPO: ``model.generate``, the reward, one student forward+backward, an AdamW step (no
  reference model at beta 0, no old log-probs on-policy).
- agentopd GRPO: the ``hf`` engine, the reward, one student forward+backward (old log-probs from
  it, detached), an AdamW step; ``train`` keeps and EMA-updates a teacher copy for every estimator
  (memory and a parameter sweep per step that TRL GRPO does not have).
- The loss aggregation differs where the two libraries differ: TRL SDPO averages per sequence then
  over sequences, agentopd over the masked tokens of the whole batch (the same cost).

Measured per arm: seconds per step from the start of one step to the start of the next (TRL: the
``on_step_begin`` callback; agentopd: the start of the step's engine call; everything a step does
is inside), median and spread (min, max, IQR) over the steps after the first; generated tokens per
second of step time (the sampled completion tokens over those steps' seconds) and of generation
time alone; peak RSS (VmHWM of the arm's process, read at its end). Ratios are agentopd over TRL:
``speedup_vs_trl_sdpo`` = TRL SDPO median s/step over agentopd SDPO median s/step (agentopd
steps/s over TRL's), ``peak_rss_ratio`` = agentopd SDPO peak RSS over TRL SDPO's.

Targets, reported (met: yes/no), never asserted: agentopd at least 1.5x TRL SDPO in steps/s and at
most its peak memory.

    python bench/vs_trl.py            # full run: 12 steps per arm, the arms twice in ABBA order
    python bench/vs_trl.py --quick    # a few minutes: 5 steps per arm, each arm once
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS = ("agentopd sdpo", "trl sdpo", "agentopd grpo", "trl grpo")

SETTING = {
    "model": {"hidden": 256, "layers": 4, "heads": 4, "seed": 0},
    "problems": {"generator": "arithmetic", "n": 256, "levels": [1, 2]},
    "prompts_per_step": 8, "group_size": 4, "max_new_tokens": 32, "temperature": 1.0, "top_p": 1.0,
    "lr": 1e-4, "grad_clip": 1.0, "ema_rate": 0.05, "is_clip": 2.0, "clip_low": 0.2, "clip_high": 0.28,
    "seed": 0,
}
TARGETS = {"speedup_vs_trl_sdpo": 1.5, "peak_rss_ratio": 1.0}  # >= 1.5x steps/s, <= 1.0x peak RSS


def reward(answer: str, text: str) -> float:
    """1.0 if ``text`` contains the last digit of ``answer``, else 0.0 (the same on every arm)."""
    return 1.0 if answer and answer[-1] in text else 0.0


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark (VmHWM: per address space, reset by exec)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------ the arms (child processes)


def train_overrides(arm: str, model_dir: str, steps: int, out: str) -> list[str]:
    s = SETTING
    common = [f"model.path={model_dir}", "env.id=agentopd/Math-v0", f"env.kwargs.problems={s['problems']['generator']}",
              f"env.kwargs.n={s['problems']['n']}", f"env.kwargs.levels={s['problems']['levels']}",
              f"sampling.group_size={s['group_size']}", f"sampling.prompts_per_step={s['prompts_per_step']}",
              f"sampling.max_new_tokens={s['max_new_tokens']}", f"sampling.temperature={s['temperature']}",
              f"sampling.top_p={s['top_p']}", "teacher.mode=ema", f"teacher.tau={s['ema_rate']}",
              "teacher.context=[demonstration]", "teacher.self_demonstration=false",
              f"optim.lr={s['lr']}", f"optim.grad_clip={s['grad_clip']}", "optim.weight_decay=0",
              f"optim.micro_batch={s['prompts_per_step'] * s['group_size']}", "optim.epochs_per_batch=1",
              "algo.ref_kl=0", f"run.steps={steps}", f"run.seed={s['seed']}", f"run.out={out}",
              "run.checkpoint_every=0", "eval.problems=0", "run.samples_every=0", "run.progress=false",
              "run.device=cpu", "run.precision=off"]
    if arm == "agentopd sdpo":
        return common + ["algo.loss=sdpo_token", "algo.distill_alpha=1.0", f"algo.is_clip={s['is_clip']}",
                         f"algo.rollout_is_clip={s['is_clip']}"]
    return common + ["algo.loss=pg", "algo.advantage=grpo", "algo.advantage_kwargs={std_normalize: true}",
                     f"algo.clip_low={s['clip_low']}", f"algo.clip_high={s['clip_high']}",
                     f"algo.rollout_is_clip={s['is_clip']}"]


def run_agentopd(arm: str, model_dir: str, steps: int, out: str) -> dict:
    from agentopd.judges import BaseJudge

    from agentopd.config import load
    from agentopd.inference.hf import HFEngine
    from agentopd.train import train
    from agentopd.types import Judgement, Verdict

    rec = {"step_starts": [], "tokens": [], "generate_s": [], "prompts": [], "rewards": []}

    class TimedEngine(HFEngine):  # one engine call per step (sampling.generate_chunk=0): its start is the step's
        def generate(self, prompt_ids, **kw):
            t0 = time.perf_counter()
            rec["step_starts"].append(t0)
            got = super().generate(prompt_ids, **kw)
            rec["generate_s"].append(time.perf_counter() - t0)
            rec["tokens"].append(sum(len(g.response_ids) for gs in got for g in gs))
            return got

    class RewardJudge(BaseJudge):
        workers = 1

        def judge(self, problem, response):
            r = reward(str(problem.payload["answer"]), response)
            return Judgement(Verdict(r, int(r), 1, "ok" if r == 1.0 else "wrong_answer"), "")

        def judge_many(self, pairs, progress=None):
            rec["prompts"].append([p.prompt for p, _ in pairs[::SETTING["group_size"]]])
            got = [self.judge(p, text) for p, text in pairs]
            rec["rewards"].append(sum(j.verdict.score for j in got) / max(len(got), 1))
            return got

    cfg = load(None, train_overrides(arm, model_dir, steps, out))
    rows = train(cfg, engine=TimedEngine, judge=RewardJudge())
    rec["end"] = time.perf_counter()
    rec["teacher_signal_frac"] = [r["teacher_signal_frac"] for r in rows]
    return rec


def trl_problems(model_dir: str, n_prompts: int) -> list:
    """The first ``n_prompts`` problems in the order ``agentopd train`` draws them (its _setup and order)."""
    import numpy as np

    from agentopd.config import load
    from agentopd.rollout import env_specs, make_envs

    cfg = load(None, train_overrides("agentopd sdpo", model_dir, 1, tempfile.gettempdir()))
    env_id, kw, _ = env_specs(cfg)
    venv = make_envs(env_id, kw, [1])[0]  # the env agentopd train draws from (its _envs, _starts)
    problems = list(venv.problems)
    venv.close()
    order = np.random.default_rng(cfg.run.seed).permutation(len(problems)).tolist()
    return [problems[order[i % len(order)]] for i in range(n_prompts)]


def run_trl(arm: str, model_dir: str, steps: int, out: str) -> dict:
    import os as _os

    _os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    s = SETTING
    P, G = s["prompts_per_step"], s["group_size"]
    rec = {"step_starts": [], "tokens": [], "generate_s": [], "prompts": [], "rewards": []}
    problems = trl_problems(model_dir, P * steps)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}], "answer": str(p.payload["answer"])}
                              for p in problems])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    generate = model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        got = generate(*a, **kw)
        rec["generate_s"].append(time.perf_counter() - t0)
        return got

    model.generate = timed_generate

    def reward_fn(prompts, completions, answer, completion_ids, **_):
        rec["tokens"].append(sum(len(c) for c in completion_ids))
        rec["prompts"].append([p[-1]["content"] for p in prompts[::G]])
        got = [reward(a, c[0]["content"] if isinstance(c, list) else c) for a, c in zip(answer, completions)]
        rec["rewards"].append(sum(got) / max(len(got), 1))
        return got

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            rec["step_starts"].append(time.perf_counter())

    common = {"output_dir": out, "per_device_train_batch_size": P * G, "gradient_accumulation_steps": 1,
              "num_generations": G, "max_completion_length": s["max_new_tokens"], "temperature": s["temperature"],
              "top_p": s["top_p"], "top_k": 0, "learning_rate": s["lr"], "lr_scheduler_type": "constant",
              "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": s["grad_clip"], "max_steps": steps,
              "logging_steps": steps, "save_strategy": "no", "report_to": "none", "use_cpu": True, "seed": s["seed"],
              "shuffle_dataset": False, "disable_tqdm": True, "bf16": False, "dataloader_num_workers": 0,
              "beta": 0.0, "num_iterations": 1}
    if arm == "trl sdpo":
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

        args = SDPOConfig(**common, distillation_mode="sampled_token", distillation_alpha=1.0,
                          distillation_weight=1.0, distillation_is_clip=s["is_clip"], teacher_model_kind="ema",
                          teacher_update_rate=s["ema_rate"], teacher_sync_steps=1, use_successful_as_teacher=True,
                          success_reward_threshold=1.0, dont_reprompt_on_self_success=True,
                          include_environment_feedback=False)
        trainer = SDPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=data,
                              processing_class=tok, callbacks=[StepClock()])
    else:
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**common, epsilon=s["clip_low"], epsilon_high=s["clip_high"], scale_rewards="group",
                          loss_type="dapo")
        trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=data,
                              processing_class=tok, callbacks=[StepClock()])
    trainer.train()
    rec["end"] = time.perf_counter()
    return rec


def child(arm: str, model_dir: str, steps: int, threads: int, result: str) -> None:
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as out:
        rec = (run_agentopd if arm.startswith("agentopd") else run_trl)(arm, model_dir, steps, out)
    rec.update(arm=arm, wall_s=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(),
               torch_threads=torch.get_num_threads())
    rec["step_starts"] = [t - t0 for t in rec["step_starts"]]
    rec["end"] -= t0
    with open(result, "w", encoding="utf-8") as f:
        json.dump(rec, f)


# ------------------------------------------------------------------ the parent


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run_arm(arm: str, model_dir: str, steps: int, threads: int, tmp: str) -> dict:
    result = os.path.join(tmp, f"{arm.replace(' ', '_')}-{time.monotonic_ns()}.json")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_arm", arm, model_dir, str(steps),
                           str(threads), result], check=False, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"arm {arm!r} failed (exit {proc.returncode})")
    with open(result, encoding="utf-8") as f:
        rec = json.load(f)
    rec["process_wall_s"] = time.perf_counter() - t0
    rec["loadavg_after"] = loadavg()
    return rec


def step_stats(rec: dict) -> dict:
    """Per-step seconds (the start of a step to the start of the next, so the last step, which has no
    next start and whose tail holds the end-of-run saves, is left out) over the steps after the first."""
    starts = rec["step_starts"]
    secs = [b - a for a, b in itertools.pairwise(starts)][1:]  # step 1 (warm-up) left out
    tokens = rec["tokens"][1:len(secs) + 1]
    gen = rec["generate_s"][1:len(secs) + 1]
    q = statistics.quantiles(secs, n=4) if len(secs) >= 2 else [secs[0]] * 3
    return {"n_steps": len(secs), "step_s": secs, "median_s": statistics.median(secs), "min_s": min(secs),
            "max_s": max(secs), "iqr_s": q[2] - q[0], "tokens_per_step": statistics.fmean(tokens),
            "tokens_per_s": sum(tokens) / sum(secs), "generate_tokens_per_s": sum(tokens) / sum(gen),
            "generate_s_median": statistics.median(gen), "peak_rss_bytes": rec["peak_rss_bytes"],
            "reward_mean": statistics.fmean(rec["rewards"]), "process_wall_s": rec["process_wall_s"],
            "startup_s": starts[0], "loadavg_after": rec["loadavg_after"]}


def merge(runs: list[dict]) -> dict:
    """One arm's figures over its runs: step seconds pooled, peak RSS the max."""
    per = [step_stats(r) for r in runs]
    secs = [s for p in per for s in p["step_s"]]
    q = statistics.quantiles(secs, n=4) if len(secs) >= 2 else [secs[0]] * 3
    tok = sum(p["tokens_per_step"] * p["n_steps"] for p in per)
    return {"runs": len(per), "n_steps": len(secs), "median_s": statistics.median(secs), "min_s": min(secs),
            "max_s": max(secs), "iqr_s": q[2] - q[0], "steps_per_s": 1 / statistics.median(secs),
            "tokens_per_step": tok / len(secs), "tokens_per_s": tok / sum(secs),
            "generate_tokens_per_s": statistics.fmean(p["generate_tokens_per_s"] for p in per),
            "peak_rss_bytes": max(p["peak_rss_bytes"] for p in per),
            "reward_mean": statistics.fmean(p["reward_mean"] for p in per),
            "startup_s": statistics.fmean(p["startup_s"] for p in per), "per_run": per}


def check_same_prompts(recs: dict[str, list[dict]]) -> bool:
    seqs = [r["prompts"] for runs in recs.values() for r in runs]
    return all(s == seqs[0] for s in seqs)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_arm":
        arm, model_dir, steps, threads, result = sys.argv[2:7]
        child(arm, model_dir, int(steps), int(threads), result)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 steps per arm, each arm once (a few minutes)")
    ap.add_argument("--steps", type=int, default=None, help="steps per arm run (default: 12, quick: 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every arm (default: 1)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "vs_trl.json"), help="where to write JSON")
    args = ap.parse_args(argv)
    steps = args.steps or (5 if args.quick else 12)
    order = list(ARMS) if args.quick else list(ARMS) + list(reversed(ARMS))  # ABBA: load drift hits both sides

    import torch
    import transformers
    import trl

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)), "threads": args.threads, "loadavg_start": loadavg(),
            "quick": args.quick, "steps_per_run": steps, "order": order}
    print(f"vs_trl: torch {info['torch']}, transformers {info['transformers']}, trl {info['trl']}, "
          f"{args.threads} torch thread(s), {info['cores_usable']} usable cores, load {info['loadavg_start']}; "
          f"{steps} steps per run, order {order}", flush=True)
    t_start = time.perf_counter()
    recs: dict[str, list[dict]] = {a: [] for a in ARMS}
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        from transformers.utils import logging as hf_logging

        from agentopd.testbed.tiny import build_tiny

        hf_logging.disable_progress_bar()
        model_dir = os.path.join(tmp, "llama-h256-l4")
        m = SETTING["model"]
        build_tiny(dirpath=model_dir, hidden=m["hidden"], layers=m["layers"], heads=m["heads"], seed=m["seed"])
        for arm in order:
            rec = run_arm(arm, model_dir, steps, args.threads, tmp)
            recs[arm].append(rec)
            st = step_stats(rec)
            print(f"  {arm:<14} median {st['median_s']:.3f} s/step (min {st['min_s']:.3f}, max {st['max_s']:.3f}), "
                  f"{st['tokens_per_s']:.0f} tok/s, peak RSS {st['peak_rss_bytes'] / 2**20:.0f} MiB, "
                  f"process {rec['process_wall_s']:.1f} s, load {rec['loadavg_after']}", flush=True)
    arms = {a: merge(r) for a, r in recs.items()}
    same = check_same_prompts(recs)

    def speedup(ours: str, theirs: str) -> float:
        return arms[theirs]["median_s"] / arms[ours]["median_s"]

    def rss(ours: str, theirs: str) -> float:
        return arms[ours]["peak_rss_bytes"] / arms[theirs]["peak_rss_bytes"]

    ratios = {"speedup_vs_trl_sdpo": speedup("agentopd sdpo", "trl sdpo"),
              "peak_rss_ratio": rss("agentopd sdpo", "trl sdpo"),
              "speedup_vs_trl_grpo": speedup("agentopd grpo", "trl grpo"),
              "peak_rss_ratio_grpo": rss("agentopd grpo", "trl grpo"),
              "tokens_per_s_ratio_sdpo": arms["agentopd sdpo"]["tokens_per_s"] / arms["trl sdpo"]["tokens_per_s"],
              "generate_tokens_per_s_ratio_sdpo": (arms["agentopd sdpo"]["generate_tokens_per_s"]
                                                   / arms["trl sdpo"]["generate_tokens_per_s"])}
    met = {"speedup_vs_trl_sdpo": ratios["speedup_vs_trl_sdpo"] >= TARGETS["speedup_vs_trl_sdpo"],
           "peak_rss_ratio": ratios["peak_rss_ratio"] <= TARGETS["peak_rss_ratio"]}

    print(f"\n== {steps} steps per run, figures over the steps after each run's first ==")
    print(f"{'arm':<14} {'runs':>4} {'steps':>5} {'median s':>9} {'min':>7} {'max':>7} {'IQR':>7} {'steps/s':>8} "
          f"{'tok/step':>8} {'tok/s':>7} {'gen tok/s':>9} {'peak RSS MiB':>12} {'reward':>7} {'startup s':>9}")
    for a, m in arms.items():
        print(f"{a:<14} {m['runs']:>4} {m['n_steps']:>5} {m['median_s']:>9.3f} {m['min_s']:>7.3f} {m['max_s']:>7.3f} "
              f"{m['iqr_s']:>7.3f} {m['steps_per_s']:>8.2f} {m['tokens_per_step']:>8.1f} {m['tokens_per_s']:>7.0f} "
              f"{m['generate_tokens_per_s']:>9.0f} {m['peak_rss_bytes'] / 2**20:>12.0f} {m['reward_mean']:>7.3f} "
              f"{m['startup_s']:>9.1f}")
    print("  s/step: start of a step to the start of the next; tok/s: sampled completion tokens per second of "
          "step time;\n  gen tok/s: the same per second of generation alone; startup: process start to the first "
          "step (imports, model, trainer).")
    print(f"  same prompts on every arm, step by step: {'yes' if same else 'NO'}")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}")
    print(f"  target: agentopd >= {TARGETS['speedup_vs_trl_sdpo']}x TRL SDPO steps/s: "
          f"{ratios['speedup_vs_trl_sdpo']:.2f}x -> met: {'yes' if met['speedup_vs_trl_sdpo'] else 'no'}")
    print(f"  target: agentopd peak RSS <= TRL SDPO's: {ratios['peak_rss_ratio']:.2f}x -> met: "
          f"{'yes' if met['peak_rss_ratio'] else 'no'}")

    info["loadavg_end"] = loadavg()
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(f"load average at end {info['loadavg_end']}; total {info['wall_s']:.0f} s")
    report = {"info": info, "setting": SETTING, "targets": TARGETS, "target_met": met, **ratios,
              "same_prompts": same, "arms": arms,
              "step_definition": "start of a step to the start of the next (TRL: on_step_begin; agentopd: the "
                                 "step's engine call), the first step of each run left out, the last step has no "
                                 "next start and is left out too"}
    write_report(args.json, report)
    return 0


def write_report(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())

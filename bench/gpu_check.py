"""GPU check: the figures and the correctness checks that only a GPU run can give, in one script.

No network, no downloads: the models are built from configs. A Llama shaped like a 1.5B model
(hidden 1536, 28 layers, 12 heads / 2 KV heads, MLP 8960, vocabulary 151936, random weights, float32
master weights as the learner keeps them) gives the speed figures; the tiny model runs the training
loop. Every stage synchronizes the device before each timestamp and records its peak memory
(``torch.cuda.max_memory_allocated``, reset before the stage); a stage that fails records its error
and the others still run.

1. ``generate``: tokens/s of the ``hf`` engine under bf16 autocast (the rollouts' setting), against
   ``model.generate`` on the same batch (``engine_over_model_generate``: issue 14's 1.0x), and of
   the ``vllm`` engine (bf16 weights saved to a temp dir; run after the learner stages) when vLLM is
   importable, with the seconds of one step's sleep and weight sync and greedy samples unchanged by it.
2. ``ppo_ratio``: on those samples, the epoch-0 PPO ratio ``exp(learner - old)``, with ``old`` the
   no-grad rescoring the update uses (should be 1 with clip fraction 0), and the ratio against the
   engine's own sampling log-probs (what a rollout importance weight would correct).
3. ``agreement``: per-token log-probs and a policy-gradient loss on one batch, bf16 autocast vs float32.
4. ``learner``: forward+backward seconds of the update's path (final hidden states, chunked log-probs)
   plain, with gradient checkpointing, with LoRA (r=16, all linear layers) and with both.
5. ``sdpo_over_grpo``: seconds of a GRPO step (student scoring + forward/backward) and of an SDPO
   step (plus the teacher scoring under a longer context) on the 1.5B shape; and the train loop on
   the tiny model (``algo.advantage`` sd_token vs grpo; mean step over the steps after the first,
   from the ``time_*`` metrics; clip fraction of every step, epoch 0).
6. ``recipe_*``: every recipe of configs/recipes/ (:func:`recipe_overrides`) trained for 2 steps as
   its own ``agentopd train`` process, its models swapped for small local ones (same tokenizer,
   head dimension 64 as vLLM's attention kernels want) and its problems for generated ones: the
   recipe's engine (vLLM colocated, sleeping and syncing each step; ``hf`` where vLLM is missing,
   as the stage records), LoRA or full, its algorithm and teacher (the separate teacher model of the
   OPD recipes), gradient checkpointing; the 8-GPU recipes under ``torchrun`` with FSDP2 over as many
   GPUs as there are (up to 8; one GPU: a single process). ``--smoke``: one recipe (its path on
   the CPU with the ``hf`` engine); tests/test_recipes.py dry-runs all of them.

    python bench/gpu_check.py            # on one GPU; writes bench/results/gpu_check.json
    python bench/gpu_check.py --only stages --out A.json    # stages 1-5 alone (under 8 minutes)
    python bench/gpu_check.py --only recipes --out B.json   # stage 6 alone (about 40 s a recipe)
    python bench/gpu_check.py --smoke    # tiny sizes, on CPU in seconds: checks that the script works
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {
    "full": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000),
}
SIZES = {  # gen_*: the engine's batch; learn_*: the learner's micro-batch; loop_steps: train-loop steps per arm
    "full": dict(gen_batch=32, gen_prompt=128, gen_new=128, learn_batch=8, learn_prompt=256, learn_resp=256,
                 teacher_extra=256, reps=3, loop_steps=4),
    "smoke": dict(gen_batch=2, gen_prompt=8, gen_new=8, learn_batch=2, learn_prompt=8, learn_resp=8,
                  teacher_extra=8, reps=1, loop_steps=1),
}
CHUNK = 128  # optim.logits_chunk's default


class Stage:
    """``with Stage(results, name, device) as out:`` fill ``out``; adds seconds, peak memory, or the error."""

    def __init__(self, results: dict, name: str, device: torch.device):
        self.results, self.name, self.device, self.out = results, name, device, {}

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = now(self.device)
        return self.out

    def __exit__(self, kind, err, tb):
        self.out["seconds"] = round(now(self.device) - self.t0, 3)
        if self.device.type == "cuda":
            self.out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if err is not None:
            self.out["error"] = "".join(traceback.format_exception_only(kind, err)).strip()[-500:]
            print(f"[{self.name}] failed: {self.out['error']}", file=sys.stderr)
        self.results[self.name] = self.out
        print(f"[{self.name}] {json.dumps(self.out)}", file=sys.stderr)
        return kind is None or issubclass(kind, Exception)  # after a failed stage the next ones still run


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def amp(device: torch.device, on: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


class _NoText:
    """A tokenizer stand-in for random token ids: no eos, pad 0, empty text."""

    eos_token_id, pad_token_id = None, 0

    def decode(self, ids, skip_special_tokens=True):
        return ""

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["" for _ in rows]


def build_llama(shape: dict, device: torch.device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0,
                         bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    with device:
        model = LlamaForCausalLM(config).float()
    model.generation_config.eos_token_id = None  # every sample runs to its length
    return model


def random_ids(rows: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (rows, length), generator=g).tolist()


# ------------------------------------------------------------------ 1. generation


def bench_hf_generate(model, sizes: dict, device, out: dict):
    from agentopd.inference.hf import HFEngine

    prompts = random_ids(sizes["gen_batch"], sizes["gen_prompt"], model.config.vocab_size, 1)
    engine = HFEngine(model, _NoText(), batch_size=sizes["gen_batch"])
    with amp(device):
        engine.generate(prompts[:1], max_new_tokens=4, seed=0)  # warm-up
        t0 = now(device)
        gens = engine.generate(prompts, max_new_tokens=sizes["gen_new"], seed=0)
        seconds = now(device) - t0
    n = sum(len(g.response_ids) for gs in gens for g in gs)
    out.update(tokens=n, batch=len(prompts), tokens_per_s=round(n / seconds, 1))
    ids_BL = torch.tensor(prompts, device=device)  # the same batch through transformers' own sampler
    with amp(device), torch.no_grad():
        t0 = now(device)
        new_BT = model.generate(input_ids=ids_BL, attention_mask=torch.ones_like(ids_BL), do_sample=True, top_k=0,
                                max_new_tokens=sizes["gen_new"], min_new_tokens=sizes["gen_new"],
                                pad_token_id=0)[:, ids_BL.shape[1]:]
        seconds = now(device) - t0
    out.update(model_generate_tokens_per_s=round(new_BT.numel() / seconds, 1),
               engine_over_model_generate=round(out["tokens_per_s"] / (new_BT.numel() / seconds), 3))
    return prompts, [gs[0] for gs in gens]


def bench_vllm_generate(model, sizes: dict, out: dict) -> None:
    """The ``vllm`` engine as ``train`` runs it (agentopd.inference.vllm): tokens/s, then one step's
    weight cycle (sleep level 2, wake the weights, sync from the learner, wake the KV cache), timed,
    and greedy samples after it equal to the ones before (a missed weight would be garbage)."""
    try:
        from agentopd.inference.vllm import VLLMEngine, require_vllm

        vllm = require_vllm()
    except ImportError as e:
        out["skipped"] = str(e)
        return
    with tempfile.TemporaryDirectory() as d:  # bf16 copies of the weights; the model keeps its float32 ones
        model.save_pretrained(d, state_dict={k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
        engine = VLLMEngine(d, skip_tokenizer_init=True, dtype="bfloat16", gpu_memory_utilization=0.3,
                            max_model_len=sizes["gen_prompt"] + sizes["gen_new"] + 8, sleep_level=2)
    cuda = torch.device("cuda")
    prompts = random_ids(sizes["gen_batch"], sizes["gen_prompt"], model.config.vocab_size, 1)
    engine.generate(prompts[:1], max_new_tokens=4, seed=0)  # warm-up
    t0 = now(cuda)
    gens = engine.generate(prompts, max_new_tokens=sizes["gen_new"], seed=0)
    seconds = now(cuda) - t0
    n = sum(len(g.response_ids) for gs in gens for g in gs)
    out.update(version=vllm.__version__, tokens=n, tokens_per_s=round(n / seconds, 1))
    greedy = [gs[0].response_ids for gs in engine.generate(prompts[:4], max_new_tokens=16, temperature=0)]
    t0 = now(cuda)
    engine.sleep()
    out["sleep_s"] = round(now(cuda) - t0, 3)
    t0 = now(cuda)
    engine.sync(model)
    out["sync_s"] = round(now(cuda) - t0, 3)
    again = [gs[0].response_ids for gs in engine.generate(prompts[:4], max_new_tokens=16, temperature=0)]
    out["greedy_same_after_sync"] = again == greedy
    del engine


# ------------------------------------------------------------------ 2.-4. the learner's path


def learner_logprobs(model, prompts, responses, device, on: bool = True):
    """The update's log-probs: final hidden states under autocast, then the chunked head product."""
    from agentopd.rl.logprobs import hidden_logprobs, lm_head_weight, response_hidden

    with amp(device, on):
        hidden_BRH = response_hidden(model, prompts, responses)
        return torch.cat(hidden_logprobs(hidden_BRH, lm_head_weight(model), responses, CHUNK)[0])


def ratio_stats(log_ratio_N: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.28) -> dict:
    ratio_N = log_ratio_N.double().exp()
    return {"ratio_mean": float(ratio_N.mean()), "ratio_max_abs_dev": float((ratio_N - 1).abs().max()),
            "clip_frac": float(((ratio_N < 1 - clip_low) | (ratio_N > 1 + clip_high)).double().mean())}


def bench_ppo_ratio(model, prompts, gens, device, out: dict) -> None:
    from agentopd.rl.logprobs import sequence_logprobs

    responses = [g.response_ids for g in gens]
    with torch.no_grad(), amp(device):  # what train scores as the old log-probs
        old = torch.cat(sequence_logprobs(model, prompts, responses, chunk=CHUNK)[0])
    model.train()
    learner = learner_logprobs(model, prompts, responses, device)
    engine = torch.tensor([lp for g in gens for lp in g.logprobs], device=learner.device)
    out["epoch0_vs_rescoring"] = ratio_stats(learner.detach() - old)
    out["learner_vs_engine"] = ratio_stats(learner.detach() - engine)


def bench_agreement(model, sizes: dict, device, out: dict) -> None:
    prompts, responses = learner_batch(model, sizes, 2)
    g = torch.Generator().manual_seed(3)
    adv_N = torch.randn(sum(len(r) for r in responses), generator=g).to(device)
    with torch.no_grad():
        lp = {on: learner_logprobs(model, prompts, responses, device, on) for on in (True, False)}
    diff_N = (lp[True] - lp[False]).abs()
    loss = {on: float(-(lp[on] * adv_N).mean()) for on in lp}  # the policy-gradient surrogate
    out.update(logprob_max_abs_diff=float(diff_N.max()), logprob_mean_abs_diff=float(diff_N.mean()),
               loss_bf16=loss[True], loss_fp32=loss[False],
               loss_rel_diff=abs(loss[True] - loss[False]) / max(abs(loss[False]), 1e-12))


def learner_batch(model, sizes: dict, seed: int):
    B, V = sizes["learn_batch"], model.config.vocab_size
    return random_ids(B, sizes["learn_prompt"], V, seed), random_ids(B, sizes["learn_resp"], V, seed + 1)


def fwd_bwd_seconds(model, sizes: dict, device) -> float:
    prompts, responses = learner_batch(model, sizes, 4)
    times = []
    for _ in range(sizes["reps"] + 1):  # the first is a warm-up
        model.zero_grad(set_to_none=True)
        t0 = now(device)
        (-learner_logprobs(model, prompts, responses, device).mean()).backward()
        times.append(now(device) - t0)
    model.zero_grad(set_to_none=True)
    return round(sorted(times[1:])[len(times[1:]) // 2], 4)


def bench_learner(model, sizes: dict, device, results: dict) -> None:
    """Plain and checkpointed on the full model, then LoRA (peft wraps the same model)."""
    from peft import LoraConfig, get_peft_model

    model.train()
    for gc in (False, True):
        with Stage(results, f"learner_full{'_gc' if gc else ''}", device) as out:
            (model.gradient_checkpointing_enable if gc else model.gradient_checkpointing_disable)()
            out["fwd_bwd_s"] = fwd_bwd_seconds(model, sizes, device)
    model.gradient_checkpointing_disable()
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for gc in (False, True):
        with Stage(results, f"learner_lora{'_gc' if gc else ''}", device) as out:
            (model.gradient_checkpointing_enable if gc else model.gradient_checkpointing_disable)()
            out["fwd_bwd_s"] = fwd_bwd_seconds(lora, sizes, device)
    model.gradient_checkpointing_disable()
    lora.unload()  # the plain model again, for the stages after


# ------------------------------------------------------------------ 5. SDPO over GRPO


def bench_step_ratio(model, sizes: dict, device, out: dict) -> None:
    """A GRPO step: student scoring + forward/backward; SDPO adds the teacher's scoring of the same
    responses under a context ``teacher_extra`` tokens longer (the critique)."""
    from agentopd.rl.logprobs import sequence_logprobs

    prompts, responses = learner_batch(model, sizes, 6)
    extra = random_ids(len(prompts), sizes["teacher_extra"], model.config.vocab_size, 8)
    teacher = [p + e for p, e in zip(prompts, extra)]
    model.train()

    def step(sdpo: bool) -> float:
        t0 = now(device)
        with torch.no_grad(), amp(device):
            sequence_logprobs(model, prompts, responses, chunk=CHUNK)
            if sdpo:
                sequence_logprobs(model, teacher, responses, chunk=CHUNK)
        (-learner_logprobs(model, prompts, responses, device).mean()).backward()
        model.zero_grad(set_to_none=True)
        return now(device) - t0

    times = {"grpo": [], "sdpo": []}
    for r in range(sizes["reps"] + 1):  # interleaved; the first round is a warm-up
        for arm in ("grpo", "sdpo") if r % 2 else ("sdpo", "grpo"):
            times[arm].append(step(arm == "sdpo"))
    med = {arm: sorted(t[1:])[len(t[1:]) // 2] for arm, t in times.items()}
    out.update(grpo_step_s=round(med["grpo"], 4), sdpo_step_s=round(med["sdpo"], 4),
               sdpo_over_grpo=round(med["sdpo"] / med["grpo"], 3))


def bench_loop(sizes: dict, device, tmp: str, out: dict) -> None:
    sys.path.insert(0, HERE)
    from step_cost import STAGES, train_run

    extra = (f"run.device={device.type}", "run.precision=auto")
    steps = {}
    for algo in ("grpo", "sd_token"):
        rows = train_run(algo, "tiny", sizes["loop_steps"] + 1, tmp, extra)
        per_step = [sum(r[f"time_{s}"] for s in STAGES) for r in rows[1:]]
        steps[algo] = sum(per_step) / len(per_step)
        out[f"{algo}_clipfrac"] = [r["clipfrac"] for r in rows]
        out[f"{algo}_step_s"] = round(steps[algo], 4)
    out["sdpo_over_grpo"] = round(steps["sd_token"] / steps["grpo"], 3)


# ------------------------------------------------------------------ 6. the recipes

ROOT = os.path.dirname(HERE)
RECIPES = os.path.join(ROOT, "configs", "recipes")
SMOKE_RECIPES = ("coder1.5b-opd7b-lora",)  # LoRA, a teacher model, a distillation loss


def recipe_models(tmp: str) -> tuple[str, str]:
    """A small student and a wider teacher with the same tokenizer, head dimension 64, saved."""
    from agentopd.testbed.tiny import build_tiny

    student, teacher = os.path.join(tmp, "student"), os.path.join(tmp, "teacher")
    build_tiny(student, hidden=128, layers=2, heads=2)
    build_tiny(teacher, hidden=256, layers=2, heads=4)
    return student, teacher


def recipe_overrides(path: str, student: str, teacher: str, out: str, device: torch.device, ranks: int) -> list[str]:
    """A recipe at a test's size: local models, generated problems, 2 short steps, a small vLLM."""
    from agentopd.config import load

    cfg = load(path)
    vllm = device.type == "cuda" and cfg.engine.name == "vllm" and _has_vllm()
    over = [f"model.path={student}", "env.kwargs.problems=functions", "env.kwargs.n=64", "env.heldout_kwargs={}",
            "sampling.max_new_tokens=32", f"sampling.prompts_per_step={2 * ranks}", "sampling.group_size=2",
            "run.steps=2", "run.checkpoint_every=0", "run.progress=false", f"run.out={out}", "eval.problems=2",
            "eval.every=0", f"run.device={device.type}", "teacher.max_tokens=512"]
    if cfg.teacher.model:
        over.append(f"teacher.model={teacher}")
    if vllm:
        over.append("engine.kwargs={gpu_memory_utilization: 0.25, max_model_len: 1024, enforce_eager: true}")
    else:
        over += ["engine.name=hf", "engine.kwargs={}"]
    return over


def _has_vllm() -> bool:
    try:
        from agentopd.inference.vllm import require_vllm

        require_vllm()
        return True
    except ImportError:
        return False


def bench_recipe(path: str, models: tuple[str, str], device: torch.device, tmp: str, out: dict) -> None:
    """One recipe trained for 2 steps in its own process (torchrun for the 8-GPU ones)."""
    import subprocess

    from agentopd import jsonl

    with open(path, encoding="utf-8") as f:
        eight = "--nproc-per-node 8" in f.read()
    ranks = max(1, min(torch.cuda.device_count(), 8)) if eight and device.type == "cuda" else 1
    run_out = tempfile.mkdtemp(prefix="recipe-", dir=tmp)
    over = recipe_overrides(path, *models, run_out, device, ranks)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] if ranks > 1
              else [sys.executable])
    cmd = [*launch, "-m", "agentopd", "train", "--config", path, *over]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    if r.returncode:
        raise RuntimeError(f"exit {r.returncode}: {r.stderr.strip()[-400:]}")
    rows = [row for row in jsonl.read(os.path.join(run_out, "metrics.jsonl")) if "loss" in row]
    engine = next((o.split("=", 1)[1] for o in over if o.startswith("engine.name=")), "vllm")
    out.update(ranks=ranks, engine=engine, steps=len(rows), loss=[row["loss"] for row in rows],
               reward_mean=[row["reward_mean"] for row in rows], time_sync=[row.get("time_sync") for row in rows],
               final=os.path.isdir(os.path.join(run_out, "final")))
    if len(rows) != 2 or not out["final"]:
        raise RuntimeError(f"{len(rows)} steps, final checkpoint {out['final']}")


def bench_recipes(smoke: bool, device: torch.device, tmp: str, results: dict) -> None:
    models = recipe_models(tmp)
    names = SMOKE_RECIPES if smoke else sorted(f[:-5] for f in os.listdir(RECIPES) if f.endswith(".yaml"))
    for name in names:
        with Stage(results, f"recipe_{name}", device) as out:
            bench_recipe(os.path.join(RECIPES, f"{name}.yaml"), models, device, tmp, out)


# ------------------------------------------------------------------ main


def environment(device: torch.device, smoke: bool) -> dict:
    import transformers

    env = {"smoke": smoke, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": device.type}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def run(smoke: bool, device: torch.device, only: str = "") -> dict:
    shape, sizes = SHAPES["smoke" if smoke else "full"], SIZES["smoke" if smoke else "full"]
    results = {"environment": environment(device, smoke), "shape": shape, "sizes": sizes}
    if only != "recipes":
        run_stages(smoke, device, shape, sizes, results)
    if only != "stages":
        with tempfile.TemporaryDirectory() as tmp:
            bench_recipes(smoke, device, tmp, results)
    return results


def run_stages(smoke: bool, device: torch.device, shape: dict, sizes: dict, results: dict) -> None:
    """Stages 1-5."""
    with Stage(results, "build", device) as out:
        model = build_llama(shape, device)
        out["params"] = sum(p.numel() for p in model.parameters())
    with Stage(results, "generate_hf", device) as out:
        prompts, gens = bench_hf_generate(model, sizes, device, out)
    with Stage(results, "ppo_ratio", device) as out:
        bench_ppo_ratio(model, prompts, gens, device, out)
    with Stage(results, "agreement", device) as out:
        bench_agreement(model, sizes, device, out)
    with Stage(results, "step_ratio_llama", device) as out:
        bench_step_ratio(model, sizes, device, out)
    bench_learner(model, sizes, device, results)
    if device.type == "cuda":  # last: vLLM keeps its KV cache allocated, which later peaks would count
        with Stage(results, "generate_vllm", device) as out:
            bench_vllm_generate(model, sizes, out)
    del model
    with tempfile.TemporaryDirectory() as tmp, Stage(results, "train_loop_tiny", device) as out:
        bench_loop(sizes, device, tmp, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, seconds): check the script works")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu_check.json"))
    ap.add_argument("--only", default="", choices=["", "stages", "recipes"],
                    help="stages 1-5 or the recipes alone (each fits a 10-minute command)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type != "cuda" and not a.smoke:
        print("gpu_check: no GPU; run with --smoke for a check of the script on CPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = run(a.smoke, device, a.only)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    print(f"wrote {a.out} in {results['total_seconds']} s; failed stages: {failed or 'none'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

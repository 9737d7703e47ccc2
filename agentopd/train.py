"""The training loop: rollouts → judges → self-teacher → advantages → policy-gradient update.

One readable file in the spirit of CleanRL: ``TrainConfig`` (sections of dataclasses, a docstring
per field) and ``train(cfg)``. Every stage is a plain call on plain data; token ids are the source
of truth from sampling to the update.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from agentopd.config import SamplingConfig
from agentopd.diagnose import step_metrics
from agentopd.eval.heldout import heldout_eval
from agentopd.inference.base import apply_chat
from agentopd.inference.hf import HFEngine
from agentopd.rl import distributed, objectives
from agentopd.rl.learner import (
    StepBatch,
    autocast,
    load_model,
    pick_device,
    precision,
    score,
    step_inputs,
    update,
)
from agentopd.rl.logprobs import lm_head_weight
from agentopd.rollout import problems_and_judge


@dataclass
class ModelConfig:
    path: str = "tiny"
    """'micro' (the warm-started micro model; ``agentopd micro pretrain`` builds it first when missing),
    'tiny' (a small untrained Llama built from a config, for tests) or a checkpoint dir."""
    lora_rank: int = 0
    """LoRA rank through peft; 0 trains all parameters."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more time)."""


@dataclass
class DataConfig:
    env: str = "math"
    """'math' or 'code'."""
    problems: str = "arithmetic"
    """A generator ('arithmetic', 'micro': column arithmetic, 'functions': code from examples; see
    envs.procedural), 'humaneval', or a JSONL file of problems."""
    n: int = 256
    """How many generated problems."""
    levels: list[int] = field(default_factory=lambda: [1, 2])
    """Difficulty levels of generated math problems."""
    heldout: str = ""
    """JSONL file of held-out problems for run.eval_problems; empty: the generator's held-out set
    (generated problems only; training problems that appear in it are dropped)."""
    judge: dict = field(default_factory=dict)
    """Judge spec ({name: ..., kwargs}); empty: the env's default (math or tests)."""


@dataclass
class TeacherConfig:
    mode: str = "ema"
    """ema, frozen, live or trust_region."""
    tau: float = 0.05
    """EMA rate."""
    mix: float = 0.5
    """trust_region: weight of the live model's logits."""
    use_critique: bool = True
    """Put the judge's critique in the teacher context."""
    use_demonstration: bool = True
    """Put a successful sibling's answer in the teacher context."""
    max_tokens: int = 1024
    """Cap on the teacher prompt; critique and demonstration are truncated to fit."""
    drop_critique_with_demo: bool = False
    """Leave the critique out of a context that shows a correct sibling (lasgroup/SDPO's
    ``environment_feedback_only_without_solution``, true there)."""
    strip_think: bool = False
    """Remove ``<think>...</think>`` (and the whitespace after it) from a demonstration
    (lasgroup/SDPO's ``remove_thinking_from_demonstration``, true there)."""
    self_demonstration: bool = False
    """A successful sample may be its own demonstration (the first success of its group, itself
    included); false: only another sample's (lasgroup/SDPO's ``dont_reprompt_on_self_success: true``)."""


@dataclass
class AlgoConfig:
    loss: str = "pg"
    """The per-token objective (agentopd.rl.objectives): 'pg' (PPO-clip on ``advantage``, plus
    ``distill_weight`` x the distillation loss when that is > 0), 'sdpo' (the distillation loss alone,
    importance-weighted: lasgroup/SDPO's ``loss_mode=sdpo``), 'sdpo_token' (TRL's sampled-token SDPO;
    needs ``distill_alpha: 1``) or 'mix' (``(1 - distill_weight) * pg + distill_weight * sdpo``)."""
    advantage: str = "sd_token"
    """grpo, rloo, sd_token, sd_to_go or hybrid (the advantages of the 'pg' and 'mix' losses)."""
    advantage_kwargs: dict = field(default_factory=dict)
    """Extra arguments of the estimator (std_normalize, clamp, baseline, lam, mode)."""
    clip_low: float = 0.2
    clip_high: float = 0.28
    ref_kl: float = 0.0
    """Weight of the k3 KL to the initial model (0: off)."""
    entropy: float = 0.0
    """Weight of an entropy bonus (0: off)."""
    distill_weight: float = 0.0
    """loss 'pg': weight of a KL_alpha distillation loss to the teacher on samples with a teacher
    signal, added to the policy-gradient loss (0: off); loss 'mix': the weight w in [0, 1]."""
    distill_alpha: float = 0.5
    """0: forward KL(teacher||student), 1: reverse KL(student||teacher), between: generalized JSD."""
    distill_topk: int = 100
    """Top-K of the student's distribution plus a tail bucket; 0: the full vocabulary."""
    is_clip: float = 2.0
    """'sdpo', 'sdpo_token', 'mix': each distillation token's loss times the detached
    ``min(pi_theta / pi_old, is_clip)`` (both references: 2); 0 or less: off."""
    rollout_is_clip: float = 2.0
    """Rollout correction on every loss: each token's loss times ``min(exp(ls_old - l_engine),
    rollout_is_clip)``, ``l_engine`` the engine's sampling log-prob (``Generation.logprobs``),
    ``ls_old`` the learner's before the update (lasgroup/SDPO: ``rollout_is: token``, threshold 2);
    0 or less: off. The mismatch is logged either way (``rollout_logprob_diff``, ...)."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch: int = 8
    """Sequences per forward/backward; gradients accumulate over the batch."""
    epochs_per_batch: int = 1
    """Optimizer steps per batch of rollouts (the importance ratio corrects the later ones)."""
    logits_chunk: int = 128
    """Response positions per chunk of logits: the update and the scoring form the logits from the
    final hidden states this many positions at a time (recomputed in backward), never as a whole
    [B, R, V] tensor, for the policy log-probs and full-vocabulary distillation. 0: full [B, R, V]
    logits per micro-batch (more memory). Top-K distillation always uses full logits."""


@dataclass
class RunConfig:
    steps: int = 10
    seed: int = 0
    out: str = "runs/default"
    """Where metrics.jsonl, checkpoints/step-N/ and final/ go (save_pretrained directories that
    transformers, peft and every agentopd command load; see agentopd.rl.checkpoints)."""
    checkpoint_every: int = 5
    resume: bool = False
    """Continue from the latest readable checkpoint in ``out``."""
    save_merged: bool = False
    """LoRA: also save each checkpoint's adapter merged into its base model, in ``merged/``."""
    device: str = "auto"
    distributed: str = "fsdp"
    """Under torchrun (``torchrun --nproc-per-node N -m agentopd train ...``): 'fsdp' (FSDP2, the model
    and its teacher/reference copies sharded per decoder layer) or 'ddp' (a whole copy per rank);
    see agentopd.rl.distributed. One process: ignored."""
    progress: bool = True
    tensorboard: bool = False
    """Also write the metrics as TensorBoard scalars under ``out/tb`` (needs ``tensorboard``)."""
    wandb: str = ""
    """Also log the metrics to this Weights & Biases project (needs ``wandb``); empty: off."""
    eval_problems: int = 0
    """Held-out problems for pass@1 before training, every ``eval_every`` steps and at the end (0: off)."""
    eval_every: int = 0
    """Steps between held-out evaluations (0: only before and after)."""
    samples_every: int = 5
    """Write a few rollouts token by token to ``out/samples.jsonl`` every this many steps, at each
    held-out evaluation and at the last step, for ``agentopd report`` (agentopd.samples); 0: off."""
    samples_per_step: int = 4
    samples_max_tokens: int = 256
    """Tokens per written sample (its first ones)."""
    eval_samples: int = 4
    """Samples per held-out problem (pass@1 = mean success, at the sampling temperature)."""
    precision: str | bool = "auto"
    """Forward passes of the scoring and the update under bf16 autocast: 'bf16', 'off' (YAML reads
    a bare off as false: also accepted), or 'auto' (bf16 on CUDA, off elsewhere). Log-softmax and
    loss math stay float32."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # allowed ranges of the numeric options (agentopd.config.check_ranges; others: >=0)
    RANGES: ClassVar[dict[str, str]] = {
        "data.n": ">=1", "sampling.group_size": ">=1", "sampling.prompts_per_step": ">=1",
        "sampling.max_new_tokens": ">=1", "sampling.temperature": ">0", "sampling.top_p": "(0,1]",
        "teacher.tau": "[0,1]", "teacher.mix": "[0,1]", "teacher.max_tokens": ">=1", "algo.clip_low": "[0,1)",
        "algo.entropy": "any", "algo.distill_alpha": "[0,1]", "optim.lr": ">0", "optim.micro_batch": ">=1",
        "optim.epochs_per_batch": ">=1", "run.steps": ">=1", "run.seed": "any", "run.eval_samples": ">=1"}


# ------------------------------------------------------------------------------------ helpers


def _check_algo(cfg: TrainConfig) -> None:
    """Fail before any work on an unknown estimator or an argument it does not take."""
    import inspect

    from agentopd.config import ConfigError
    from agentopd.rl import advantages

    if cfg.algo.advantage not in advantages.ADVANTAGES:
        raise ConfigError(f"algo.advantage: unknown estimator {cfg.algo.advantage!r}; "
                          f"choices: {', '.join(sorted(advantages.ADVANTAGES))}")
    params = inspect.signature(advantages.ADVANTAGES[cfg.algo.advantage]).parameters
    bad = [k for k in cfg.algo.advantage_kwargs if k not in params or k == "inputs"]
    if bad:
        takes = [p for p in params if p != "inputs"]
        raise ConfigError(f"algo.advantage_kwargs: {cfg.algo.advantage} does not take {bad}; it takes {takes}")
    if cfg.teacher.mode not in ("ema", "frozen", "live", "trust_region"):
        raise ConfigError(f"teacher.mode: {cfg.teacher.mode!r}; choices: ema, frozen, live, trust_region")
    _check_loss(cfg.algo)
    if cfg.data.env not in ("math", "code"):
        raise ConfigError(f"data.env: {cfg.data.env!r}; choices: math, code")
    _check_judge_spec(cfg.data.judge)
    precision(cfg)


def _check_loss(algo: AlgoConfig) -> None:
    from agentopd.config import ConfigError

    if algo.loss not in objectives.OBJECTIVES:
        raise ConfigError(f"algo.loss: unknown objective {algo.loss!r}; choices: {', '.join(sorted(objectives.OBJECTIVES))}")
    if not 0.0 <= algo.distill_alpha <= 1.0:
        raise ConfigError(f"algo.distill_alpha must be in [0, 1], got {algo.distill_alpha}")
    if algo.loss == "sdpo_token" and algo.distill_alpha != 1.0:  # as TRL: the sampled-token form is reverse KL only
        raise ConfigError(f"algo.loss=sdpo_token is reverse KL only: it needs algo.distill_alpha=1, got {algo.distill_alpha}")
    if algo.loss == "mix" and not 0.0 <= algo.distill_weight <= 1.0:
        raise ConfigError(f"algo.loss=mix needs algo.distill_weight in [0, 1], got {algo.distill_weight}")


def _check_judge_spec(spec: dict) -> None:
    """The judge a config names exists (before any model loads)."""
    from agentopd.config import ConfigError
    from agentopd.judges import resolve

    name = spec.get("name") or spec.get("type") if spec else None
    try:
        if spec and not name:
            raise ValueError(f"judge config {spec} needs a 'name'")
        if name:
            resolve(name)
    except ValueError as e:
        raise ConfigError(f"data.judge: {e}") from None


def _needs(module: str, option: str, package: str):
    """``module`` imported, or a ConfigError that names the option and how to install the package."""
    try:
        return importlib.import_module(module)
    except ImportError:
        from agentopd.config import ConfigError

        raise ConfigError(f"{option} needs the {package} package: pip install {package}") from None


def _metric_sinks(cfg: TrainConfig) -> list:
    """``(log(row), close())`` for each place besides metrics.jsonl that the metrics rows go to."""
    sinks = []
    if cfg.run.tensorboard:
        tb = _needs("torch.utils.tensorboard", "run.tensorboard", "tensorboard").SummaryWriter(
            os.path.join(cfg.run.out, "tb"))

        def log_tb(row):
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, row["step"])
        sinks.append((log_tb, tb.close))
    if cfg.run.wandb:
        wandb = _needs("wandb", "run.wandb", "wandb")
        run = wandb.init(project=cfg.run.wandb, config=dataclasses.asdict(cfg), dir=cfg.run.out)
        sinks.append((lambda row: run.log(row, step=row["step"]), run.finish))
    return sinks


def _timed(fn, *args):
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


# --------------------------------------------------------------------------------- the loop


def _rollouts(cfg: TrainConfig, engine, judge, pool, amp, batch, prompt_ids, step: int, t: dict):
    """1. G samples per prompt (token ids, sampling log-probs), chunk by chunk of prompts; 2. each
    chunk judged on the worker thread while the next one generates (a failed or crashed sample never
    aborts the step). ``t``: generate, execute (judging not hidden behind generation), execute_total."""
    P, G = len(batch), cfg.sampling.group_size
    gens, pending = [], []
    per_call = cfg.sampling.generate_chunk or P
    for c, s in enumerate(range(0, P, per_call)):
        t0 = time.perf_counter()
        with amp():  # as evaluate() samples
            got = engine.generate(prompt_ids[s:s + per_call], n=G, max_new_tokens=cfg.sampling.max_new_tokens,
                                  temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                                  seed=cfg.run.seed * 1_000_003 + step + c * 1_000_000_007)
        t["generate"] += time.perf_counter() - t0
        gens += got
        pending.append(pool.submit(_timed, judge.judge_many,
                                   [(batch[s + i], g.text) for i, gs in enumerate(got) for g in gs]))
    samples = [(i, g) for i, gs in enumerate(gens) for g in gs]
    t0 = time.perf_counter()
    judgements = []
    for future in pending:
        got, seconds = future.result()
        judgements += got
        t["execute_total"] += seconds
    t["execute"] = time.perf_counter() - t0
    return samples, judgements


def _row(step: int, judgements, st: StepBatch, t: dict, update: tuple, rollout_metrics: dict) -> dict:
    """The step's metrics row (before any held-out evaluation)."""
    from agentopd.judges import reward_stats

    success_B = torch.tensor([j.verdict.status == "ok" for j in judgements])
    loss_sum, sums, gnorm = update
    resp_ids, mask_BT, adv_BT = st.response_ids, st.mask_BT, st.adv_BT
    ls_BT, lt_BT, tmask_B = st.old_BT, st.teacher_BT, st.teacher_mask_B
    n_resp = sum(len(r) for r in resp_ids)
    m = mask_BT.bool()
    row = {"step": step, **reward_stats(judgements), "loss": loss_sum, **sums, **rollout_metrics, "grad_norm": gnorm,
           "adv_mean": float(adv_BT[m].mean()) if m.any() else 0.0,
           "adv_std": float(adv_BT[m].std()) if m.sum() > 1 else 0.0,
           "kl_teacher": float(((ls_BT - lt_BT) * mask_BT * tmask_B[:, None]).sum()
                               / (mask_BT * tmask_B[:, None]).sum().clamp(min=1)),
           "teacher_signal_frac": float(tmask_B.mean()),
           "response_len": n_resp / max(len(resp_ids), 1), "empty_responses": sum(len(r) == 0 for r in resp_ids),
           "tokens_per_s": n_resp / max(t["generate"], 1e-9), **{f"time_{k}": v for k, v in t.items()}}
    return row | step_metrics(ls_BT, lt_BT, mask_BT, tmask_B, success_B)  # teacher_auc, ratio_correct/wrong


def _resume(cfg: TrainConfig, ckpt_dir: str, model, opt, teacher, device) -> tuple[int, int]:
    """``(step, data position)`` to start from: the newest readable checkpoint with ``run.resume``
    (whose later metrics and sample rows are cut, as they are redone), else ``(0, 0)``."""
    from agentopd.rl import checkpoints

    if not cfg.run.resume:
        return 0, 0
    start, data_pos = checkpoints.resume(ckpt_dir, model, opt, teacher, device) or (0, 0)
    for name in ("metrics.jsonl", "samples.jsonl"):  # the rows after the checkpoint (or all) are redone
        checkpoints.cut_rows(os.path.join(cfg.run.out, name), start if start else -1)
    return start, data_pos


def _setup(cfg: TrainConfig, judge):
    """Seeds, device, problems and judge (checked before the model loads), the model: ``(device,
    problems, heldout, judge, model, tokenizer)``."""
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    device = pick_device(cfg)
    problems, heldout, default_judge = problems_and_judge(cfg)  # a bad problems file fails before the model loads
    if judge is None:
        judge = default_judge
    elif hasattr(default_judge, "close"):
        default_judge.close()
    try:
        model, tok = load_model(cfg, device)
    except BaseException:
        if hasattr(judge, "close"):
            judge.close()
        raise
    return device, problems, heldout, judge, model, tok


def train(cfg: TrainConfig, engine=None, judge=None) -> list[dict]:
    """Run ``cfg.run.steps`` steps; returns the metrics rows (also appended to metrics.jsonl).
    ``engine`` / ``judge``: use these instead of the ones the config names (an engine is built
    around the model by ``engine(model, tokenizer, device)`` when it is a callable class)."""
    from tqdm import tqdm

    from agentopd import samples as sample_log
    from agentopd.envs.procedural import HELDOUT_SEED
    from agentopd.rl import checkpoints
    from agentopd.rl.teacher import Teacher, TeacherTemplate, teacher_contexts

    _check_algo(cfg)
    distributed.setup(cfg)  # torchrun: the process group; progress off on ranks > 0
    os.makedirs(cfg.run.out, exist_ok=True)
    sinks = _metric_sinks(cfg) if distributed.is_main() else []
    device, problems, heldout, judge, model, tok = _setup(cfg, judge)
    amp = autocast(precision(cfg), device)
    head_VH = lm_head_weight(model)
    needs = objectives.needs(cfg.algo)
    # hidden states and logits formed chunk by chunk in the update, unless top-K distillation needs logits
    chunk = (cfg.optim.logits_chunk if head_VH is not None and not ("divergence" in needs and cfg.algo.distill_topk)
             else 0)
    order = np.random.default_rng(cfg.run.seed).permutation(len(problems)).tolist()
    teacher = Teacher(model, cfg.teacher.mode, tau=cfg.teacher.tau, mix=cfg.teacher.mix)
    ref = Teacher(model, "frozen") if cfg.algo.ref_kl else None
    distributed.wrap(cfg, model, teacher, ref, device)  # torchrun: FSDP2 or DDP (the optimizer sees the shards)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                            weight_decay=cfg.optim.weight_decay)
    engine = distributed.engine((engine or HFEngine)(model, tok, device=device), model)
    template = TeacherTemplate()
    needs_teacher = cfg.algo.advantage in ("sd_token", "sd_to_go", "hybrid") or bool(needs)
    ckpt_dir = os.path.join(cfg.run.out, "checkpoints")
    start, data_pos = _resume(cfg, ckpt_dir, model, opt, teacher, device)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")  # judging overlaps generation
    rows = []

    def log(row: dict) -> None:
        rows.append(row)
        if not distributed.is_main():
            return
        with open(os.path.join(cfg.run.out, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for sink, _ in sinks:
            sink(row)

    def evaluate() -> dict:  # the same seed every time: differences come from the model
        model.eval()
        with distributed.gathered(model), amp():  # rank 0 alone evaluates
            p1, errors = (heldout_eval(engine, tok, heldout, judge, cfg.run.eval_samples, cfg.sampling, HELDOUT_SEED)
                          if distributed.is_main() else (None, None))
        return distributed.broadcast({"heldout_pass1": p1, "heldout_judge_errors": errors})

    before = None
    if heldout and start == 0:
        log({"step": 0, **evaluate()})
        before = rows[-1]["heldout_pass1"]
    bar = tqdm(range(start, cfg.run.steps), initial=start, total=cfg.run.steps, desc="train",
               disable=not cfg.run.progress)
    for step in bar:
        t = {"generate": 0.0, "execute": 0.0, "execute_total": 0.0, "score": 0.0, "update": 0.0}
        P, G = cfg.sampling.prompts_per_step, cfg.sampling.group_size
        batch = [problems[order[(data_pos + i) % len(order)]] for i in range(P)]
        data_pos += P
        batch = distributed.rank_share(batch)  # torchrun: this rank's prompts (whole groups)
        prompt_ids = [apply_chat(tok, [{"role": "user", "content": p.prompt}]) for p in batch]
        model.eval()
        samples, judgements = _rollouts(cfg, engine, judge, pool, amp, batch, prompt_ids, step, t)

        t0 = time.perf_counter()  # 3. self-teacher: critique (+ a successful sibling), the same ids re-scored
        teacher_prompts = (teacher_contexts(tok, [p.prompt for p in batch], [g for _, g in samples], judgements,
                                            G, cfg.teacher, template) if needs_teacher
                           else [None] * len(samples))  # grpo / rloo: no self-teacher forward at all
        scores = score(cfg, model, teacher, ref, amp, prompt_ids, samples, teacher_prompts)
        t["score"] = time.perf_counter() - t0
        st, rollout_metrics = step_inputs(cfg, samples, judgements, prompt_ids, teacher_prompts, scores)

        t0 = time.perf_counter()
        upd = update(cfg, model, opt, teacher, head_VH, chunk, amp, st)
        t["update"] = time.perf_counter() - t0

        row = _row(step + 1, judgements, st, t, upd, rollout_metrics)
        last = step + 1 == cfg.run.steps
        if heldout and (last or cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0):
            row |= evaluate()
        distributed.is_main() and sample_log.record(cfg, step + 1, last, "heldout_pass1" in row, tok, batch, [g for _, g in samples], judgements, st)
        log(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl_teacher']:.3f}")
        if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0 or last:
            saved = checkpoints.save(ckpt_dir, step + 1, model, tok, opt, teacher, data_pos, cfg.run.save_merged)
            if last:
                checkpoints.export_final(saved, os.path.join(cfg.run.out, "final"))
    pool.shutdown()
    if heldout and rows and "heldout_pass1" in rows[-1] and distributed.is_main():
        was = "" if before is None else f"{before:.3f} -> "
        tqdm.write(f"held-out pass@1 ({len(heldout)} problems x {cfg.run.eval_samples}): {was}{rows[-1]['heldout_pass1']:.3f}",
                   file=sys.stderr)
    for _, close in sinks:
        close()
    if hasattr(judge, "close"):
        judge.close()
    distributed.teardown()
    return rows



"""The training loop: rollouts → judges → self-teacher → advantages → policy-gradient update.

One readable file in the spirit of CleanRL: ``TrainConfig`` (sections of dataclasses, a docstring
per field) and ``train(cfg)``. Every stage is a plain call on plain data; token ids are the source
of truth from sampling to the update.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from agentopd import losses
from agentopd.engine import (
    HFEngine,
    apply_chat,
    gather_logprobs,
    hidden_logprobs,
    lm_head_weight,
    response_hidden,
    response_logits,
    sequence_logprobs,
)


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
class SamplingConfig:
    group_size: int = 4
    """Samples per prompt (G)."""
    prompts_per_step: int = 4
    """Prompts per training step."""
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    generate_chunk: int = 0
    """Prompts per engine call; each chunk's samples are judged on a worker thread while the next
    chunk generates. 0: all prompts in one call."""


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


@dataclass
class AlgoConfig:
    advantage: str = "sd_token"
    """grpo, rloo, sd_token, sd_to_go or hybrid."""
    advantage_kwargs: dict = field(default_factory=dict)
    """Extra arguments of the estimator (std_normalize, clamp, baseline, lam, mode)."""
    clip_low: float = 0.2
    clip_high: float = 0.28
    ref_kl: float = 0.0
    """Weight of the k3 KL to the initial model (0: off)."""
    entropy: float = 0.0
    """Weight of an entropy bonus (0: off)."""
    distill_weight: float = 0.0
    """Weight of a KL_alpha distillation loss to the teacher on samples with a teacher signal
    (0: off; it adds to the policy-gradient loss of ``advantage``)."""
    distill_alpha: float = 0.5
    """0: forward KL(teacher||student), 1: reverse KL(student||teacher), between: generalized JSD."""
    distill_topk: int = 100
    """Top-K of the student's distribution plus a tail bucket; 0: the full vocabulary."""


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
    """Where metrics.jsonl and checkpoints go."""
    checkpoint_every: int = 5
    resume: bool = False
    """Continue from the latest checkpoint in ``out``."""
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = False
    """Also write the metrics as TensorBoard scalars under ``out/tb`` (needs ``tensorboard``)."""
    wandb: str = ""
    """Also log the metrics to this Weights & Biases project (needs ``wandb``); empty: off."""
    eval_problems: int = 0
    """Held-out problems for pass@1 before training, every ``eval_every`` steps and at the end (0: off)."""
    eval_every: int = 0
    """Steps between held-out evaluations (0: only before and after)."""
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


def pad_BT(rows: list, value: float = 0.0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D sequences to [B, T]; returns (values_BT, mask_BT)."""
    T = max((len(r) for r in rows), default=0)
    out_BT = torch.full((len(rows), max(T, 1)), value, dtype=dtype)
    mask_BT = torch.zeros((len(rows), max(T, 1)), dtype=torch.float32)
    for i, r in enumerate(rows):
        if len(r):
            out_BT[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
            mask_BT[i, : len(r)] = 1.0
    return out_BT, mask_BT


def _load_model(cfg: TrainConfig, device):
    from agentopd.engines import load_pretrained

    model, tok = load_pretrained(cfg.model.path, seed=cfg.run.seed, progress=cfg.run.progress)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.model.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.model.lora_rank, lora_alpha=2 * cfg.model.lora_rank,
                                                 target_modules="all-linear"))
    return model.to(device), tok


def _problems_and_judge(cfg: TrainConfig):
    """(training problems, held-out problems or None, judge)."""
    from agentopd.envs.data import (
        load_code_problems,
        load_humaneval,
        load_math_problems,
    )
    from agentopd.envs.procedural import GENERATORS, HELDOUT_SEED, generated_problems
    from agentopd.judges import make_judge

    if cfg.data.env not in ("math", "code"):
        raise ValueError(f"data.env must be 'math' or 'code', got {cfg.data.env!r}")
    load = load_math_problems if cfg.data.env == "math" else load_code_problems
    heldout = None
    if cfg.data.problems in GENERATORS:
        if GENERATORS[cfg.data.problems] != cfg.data.env:
            raise ValueError(f"data.problems={cfg.data.problems!r} makes {GENERATORS[cfg.data.problems]} problems,"
                             f" but data.env is {cfg.data.env!r}")
        problems = generated_problems(cfg.data.problems, cfg.data.n, cfg.data.levels, cfg.run.seed + 1)
        if cfg.run.eval_problems and not cfg.data.heldout:
            heldout = generated_problems(cfg.data.problems, cfg.run.eval_problems, cfg.data.levels, HELDOUT_SEED)
            seen = {p.prompt for p in heldout}
            problems = [p for p in problems if p.prompt not in seen]
    elif cfg.data.problems == "humaneval":
        problems = load_humaneval()
    else:
        problems = load(cfg.data.problems)
    if cfg.run.eval_problems and heldout is None:
        if not cfg.data.heldout:
            raise ValueError("run.eval_problems needs data.heldout (a JSONL file) for non-generated problems")
        heldout = load(cfg.data.heldout)[:cfg.run.eval_problems]
    judge = make_judge(cfg.data.judge or ("math" if cfg.data.env == "math" else "tests"))
    return problems, heldout, judge


def heldout_pass1(engine, tok, problems, judge, n: int, sampling: SamplingConfig, seed: int) -> float:
    """Held-out pass@1: the mean success of ``n`` samples per problem at the sampling temperature,
    over the judged samples. Judge errors (an outage, not a wrong answer) are left out and their
    count said on stderr; NaN when no sample could be judged."""
    from agentopd.engine import apply_chat

    gens = engine.generate([apply_chat(tok, [{"role": "user", "content": p.prompt}]) for p in problems], n=n,
                           max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                           top_p=sampling.top_p, seed=seed)
    verdicts = judge.judge_many([(p, g.text) for p, gs in zip(problems, gens) for g in gs])
    judged = [j.verdict.status for j in verdicts if j.verdict.status != "judge_error"]
    if len(judged) < len(verdicts):
        print(f"held-out pass@1: {len(verdicts) - len(judged)} of {len(verdicts)} samples could not be judged "
              "(judge_error); left out", file=sys.stderr)
    return sum(s == "ok" for s in judged) / len(judged) if judged else math.nan


def _check_algo(cfg: TrainConfig) -> None:
    """Fail before any work on an unknown estimator or an argument it does not take."""
    import inspect

    from agentopd import advantages
    from agentopd.config import ConfigError

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
    if cfg.data.env not in ("math", "code"):
        raise ConfigError(f"data.env: {cfg.data.env!r}; choices: math, code")
    _check_judge_spec(cfg.data.judge)
    _precision(cfg)


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


def _precision(cfg: TrainConfig) -> str:
    precision = "off" if cfg.run.precision is False else cfg.run.precision
    if precision not in ("auto", "bf16", "off"):
        from agentopd.config import ConfigError

        raise ConfigError(f"run.precision: {cfg.run.precision!r}; choices: auto, bf16, off")
    return precision


def _autocast(precision: str, device: torch.device):
    """A factory of the forward passes' context: bf16 autocast under 'bf16', and under 'auto' on CUDA."""
    on = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


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


def _teacher_hidden(teacher, prompt_ids: list[list[int]], response_ids: list[list[int]]):
    """The teacher's final hidden states ``[B, R, H']`` and head weight ``[V, H']`` whose product is
    its logits. trust_region: both models side by side, ``(1 - mix) * frozen + mix * live`` logits
    as one product ``[(1 - mix) h_frozen, mix h_live] @ [W_frozen, W_live].T``."""
    if teacher.mode != "trust_region":
        model = teacher.model_for_scoring()
        return response_hidden(model, prompt_ids, response_ids), lm_head_weight(model)
    parts = [(c * response_hidden(m, prompt_ids, response_ids), lm_head_weight(m))
             for m, c in ((teacher.copy, 1 - teacher.mix), (teacher.student, teacher.mix))]
    return torch.cat([h for h, _ in parts], -1), torch.cat([w for _, w in parts], -1)


def _distill_kl(algo: AlgoConfig, teacher, student_BRX, head_VH, chunk: int, prompt_ids, response_ids,
                mask_BR, amp) -> torch.Tensor:
    """Token-mean KL_alpha(student, teacher) on these rows. ``chunk`` > 0: ``student_BRX`` is the
    student's final hidden states ``[B, R, H]`` and both sides' logits are formed chunk by chunk
    (``kl_alpha_chunked``); 0: it is the student's logits ``[B, R, V]`` (top-K or full KL)."""
    with torch.no_grad(), amp():
        if chunk:
            teacher_BRH, teacher_head_VH = _teacher_hidden(teacher, prompt_ids, response_ids)
        else:
            teacher_BRV = response_logits(teacher.model_for_scoring(), prompt_ids, response_ids)
    if chunk:
        return losses.kl_alpha_chunked(student_BRX, teacher_BRH.to(student_BRX.device), head_VH, mask_BR,
                                       algo.distill_alpha, chunk, teacher_head_VH.to(student_BRX.device))
    teacher_BRV = teacher_BRV.to(student_BRX.device)
    if algo.distill_topk:
        return losses.kl_alpha_topk(student_BRX, teacher_BRV, mask_BR, algo.distill_alpha, algo.distill_topk)
    return losses.kl_alpha(student_BRX, teacher_BRV, mask_BR, algo.distill_alpha)


def _save(path: str, step: int, model, opt, teacher, data_pos: int):
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f"step-{step}.pt.tmp")
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "teacher": teacher.state_dict(), "data_pos": data_pos,
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()}}, tmp)
    os.replace(tmp, os.path.join(path, f"step-{step}.pt"))  # a crash never leaves half a checkpoint


def _latest(path: str) -> str | None:
    if not os.path.isdir(path):
        return None
    steps = [int(f[5:-3]) for f in os.listdir(path) if f.startswith("step-") and f.endswith(".pt")]
    return os.path.join(path, f"step-{max(steps)}.pt") if steps else None


# --------------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, engine=None, judge=None) -> list[dict]:
    """Run ``cfg.run.steps`` steps; returns the metrics rows (also appended to metrics.jsonl).
    ``engine`` / ``judge``: use these instead of the ones the config names (an engine is built
    around the model by ``engine(model, tokenizer, device)`` when it is a callable class)."""
    from tqdm import tqdm

    from agentopd import advantages
    from agentopd.judges import reward_stats
    from agentopd.teacher import Teacher, TeacherTemplate, teacher_contexts

    _check_algo(cfg)
    os.makedirs(cfg.run.out, exist_ok=True)
    sinks = _metric_sinks(cfg)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    device = torch.device("cuda" if cfg.run.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.run.device == "auto" else cfg.run.device))
    model, tok = _load_model(cfg, device)
    amp = _autocast(_precision(cfg), device)
    head_VH = lm_head_weight(model)
    # hidden states and logits formed chunk by chunk in the update, unless top-K distillation needs logits
    chunk = (cfg.optim.logits_chunk if head_VH is not None and not (cfg.algo.distill_weight and cfg.algo.distill_topk)
             else 0)
    problems, heldout, default_judge = _problems_and_judge(cfg)
    if judge is None:
        judge = default_judge
    elif hasattr(default_judge, "close"):
        default_judge.close()
    order = np.random.default_rng(cfg.run.seed).permutation(len(problems)).tolist()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                            weight_decay=cfg.optim.weight_decay)
    teacher = Teacher(model, cfg.teacher.mode, tau=cfg.teacher.tau, mix=cfg.teacher.mix)
    ref = Teacher(model, "frozen") if cfg.algo.ref_kl else None
    engine = (engine or HFEngine)(model, tok, device=device)
    template = TeacherTemplate()
    needs_teacher = cfg.algo.advantage in ("sd_token", "sd_to_go", "hybrid") or cfg.algo.distill_weight > 0
    start, data_pos = 0, 0
    ckpt_dir = os.path.join(cfg.run.out, "checkpoints")
    if cfg.run.resume and (latest := _latest(ckpt_dir)):
        state = torch.load(latest, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        teacher.load_state_dict(state["teacher"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        start, data_pos = state["step"], state["data_pos"]
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")  # judging overlaps generation
    rows = []

    def log(row: dict) -> None:
        rows.append(row)
        with open(os.path.join(cfg.run.out, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for sink, _ in sinks:
            sink(row)

    from agentopd.envs.procedural import HELDOUT_SEED

    def evaluate() -> float:  # the same seed every time: differences come from the model
        model.eval()
        with amp():
            return heldout_pass1(engine, tok, heldout, judge, cfg.run.eval_samples, cfg.sampling, HELDOUT_SEED)

    before = None
    if heldout and start == 0:
        before = evaluate()
        log({"step": 0, "heldout_pass1": before})
    bar = tqdm(range(start, cfg.run.steps), initial=start, total=cfg.run.steps, desc="train",
               disable=not cfg.run.progress)
    for step in bar:
        t = {"generate": 0.0, "execute": 0.0, "execute_total": 0.0, "score": 0.0, "update": 0.0}
        P, G = cfg.sampling.prompts_per_step, cfg.sampling.group_size
        batch = [problems[order[(data_pos + i) % len(order)]] for i in range(P)]
        data_pos += P

        # 1. rollouts: G samples per prompt, token ids and sampling log-probs, chunk by chunk of prompts;
        # 2. judges: each chunk is judged on the worker thread while the next one generates (one failed
        # or crashed sample never aborts the step). execute: the judging not hidden behind generation.
        prompt_ids = [apply_chat(tok, [{"role": "user", "content": p.prompt}]) for p in batch]
        model.eval()
        gens, pending = [], []
        per_call = cfg.sampling.generate_chunk or P
        for c, s in enumerate(range(0, P, per_call)):
            t0 = time.perf_counter()
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
        rewards_B = torch.tensor([math.nan if j.verdict.status == "judge_error" else j.verdict.score
                                  for j in judgements])
        success_B = torch.tensor([j.verdict.status == "ok" for j in judgements])

        # 3. self-teacher: critique (+ a successful sibling), the same response ids re-scored
        t0 = time.perf_counter()
        resp_ids = [g.response_ids for _, g in samples]
        teacher_prompts = teacher_contexts(tok, [p.prompt for p in batch], [g for _, g in samples], judgements,
                                           G, cfg.teacher, template)
        if not needs_teacher:  # grpo / rloo: no self-teacher forward at all
            teacher_prompts = [None] * len(samples)
        teacher_mask_B = torch.tensor([tp is not None for tp in teacher_prompts], dtype=torch.float32)
        def score(scorer, prompts, responses):
            return sequence_logprobs(scorer, prompts, responses, chunk=cfg.optim.logits_chunk)[0]

        with torch.no_grad(), amp():
            student_lp = score(model, [prompt_ids[i] for i, _ in samples], resp_ids)
            scored = [b for b, tp in enumerate(teacher_prompts) if tp is not None]
            teacher_lp = [torch.zeros(len(r)) for r in resp_ids]
            if scored:
                got = score(teacher.model_for_scoring(), [teacher_prompts[b] for b in scored],
                            [resp_ids[b] for b in scored])
                for b, lp in zip(scored, got):
                    teacher_lp[b] = lp.float().cpu()
            ref_lp = score(ref.model_for_scoring(), [prompt_ids[i] for i, _ in samples], resp_ids) if ref else None
        ls_BT, mask_BT = pad_BT([lp.float().cpu() for lp in student_lp])
        lt_BT, _ = pad_BT(teacher_lp)
        group_B = torch.tensor([i for i, _ in samples])
        t["score"] = time.perf_counter() - t0

        # 4. advantages; judge errors and empty responses carry no gradient
        inputs = advantages.AdvantageInputs(rewards_B, group_B, mask_BT, ls_BT, lt_BT, teacher_mask_B, success_B)
        adv_BT = advantages.compute(cfg.algo.advantage, inputs, **cfg.algo.advantage_kwargs)
        keep_B = ~torch.isnan(rewards_B)
        mask_BT = mask_BT * keep_B[:, None]
        adv_BT = torch.nan_to_num(adv_BT) * mask_BT

        # 5. update: micro-batches, gradient accumulation, importance ratio over epochs
        t0 = time.perf_counter()
        model.train()
        n_tok = mask_BT.sum().clamp(min=1)
        n_teacher_tok = (mask_BT * teacher_mask_B[:, None]).sum().clamp(min=1)
        loss_sum, clipfrac, distill_sum = 0.0, 0.0, 0.0
        for _ in range(cfg.optim.epochs_per_batch):
            opt.zero_grad(set_to_none=True)
            for s in range(0, len(samples), cfg.optim.micro_batch):
                idx = list(range(s, min(s + cfg.optim.micro_batch, len(samples))))
                if mask_BT[idx].sum() == 0:
                    continue
                R_ = [resp_ids[b] for b in idx]
                with amp():  # the student's final hidden states [B, R, H] (chunk > 0) or its logits [B, R, V]
                    out_BRX = (response_hidden if chunk else response_logits)(
                        model, [prompt_ids[samples[b][0]] for b in idx], R_)
                lp_BT = _stack(hidden_logprobs(out_BRX, head_VH, R_, chunk)[0] if chunk else
                               gather_logprobs(out_BRX, R_), ls_BT.shape[1])
                m_BT = mask_BT[idx].to(lp_BT.device)
                loss, met = losses.policy_loss(lp_BT, ls_BT[idx].to(lp_BT.device), adv_BT[idx].to(lp_BT.device),
                                               m_BT, cfg.algo.clip_low, cfg.algo.clip_high)
                weight = m_BT.sum() / n_tok  # token-mean over the whole batch, not per micro-batch
                loss = loss * weight
                if ref is not None:
                    ref_BT, _ = pad_BT([r.float().cpu() for r in ref_lp])
                    loss = loss + cfg.algo.ref_kl * weight * losses.ref_kl_k3(lp_BT, ref_BT[idx].to(lp_BT.device), m_BT)
                rows_t = [k for k, b in enumerate(idx) if teacher_prompts[b] is not None and len(R_[k])]
                if cfg.algo.distill_weight and rows_t:
                    Rm = max(len(R_[k]) for k in rows_t)
                    dm_BR = m_BT[rows_t, :Rm]
                    kl = _distill_kl(cfg.algo, teacher, out_BRX[rows_t, :Rm], head_VH, chunk,
                                     [teacher_prompts[idx[k]] for k in rows_t], [R_[k] for k in rows_t], dm_BR, amp)
                    dloss = cfg.algo.distill_weight * kl * (dm_BR.sum() / n_teacher_tok)
                    loss = loss + dloss
                    distill_sum += float(dloss.detach())
                loss.backward()
                loss_sum += float(loss.detach())
                clipfrac += float(met.get("clip_frac", 0.0)) * float(weight)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
        teacher.update(model)
        t["update"] = time.perf_counter() - t0

        stats = reward_stats(judgements)
        n_resp = sum(len(r) for r in resp_ids)
        m = mask_BT.bool()
        row = {"step": step + 1, **stats, "loss": loss_sum, "distill_loss": distill_sum, "grad_norm": float(gnorm), "clipfrac": clipfrac,
               "adv_mean": float(adv_BT[m].mean()) if m.any() else 0.0,
               "adv_std": float(adv_BT[m].std()) if m.sum() > 1 else 0.0,
               "kl_teacher": float(((ls_BT - lt_BT) * mask_BT * teacher_mask_B[:, None]).sum()
                                   / (mask_BT * teacher_mask_B[:, None]).sum().clamp(min=1)),
               "teacher_signal_frac": float(teacher_mask_B.mean()),
               "response_len": n_resp / max(len(resp_ids), 1), "empty_responses": sum(len(r) == 0 for r in resp_ids),
               "tokens_per_s": n_resp / max(t["generate"], 1e-9), **{f"time_{k}": v for k, v in t.items()}}
        last = step + 1 == cfg.run.steps
        if heldout and (last or cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0):
            row["heldout_pass1"] = evaluate()
        log(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl_teacher']:.3f}")
        if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0 or step + 1 == cfg.run.steps:
            _save(ckpt_dir, step + 1, model, opt, teacher, data_pos)
    pool.shutdown()
    if heldout and rows and "heldout_pass1" in rows[-1]:
        was = "" if before is None else f"{before:.3f} -> "
        tqdm.write(f"held-out pass@1 ({len(heldout)} problems x {cfg.run.eval_samples}): {was}{rows[-1]['heldout_pass1']:.3f}",
                   file=sys.stderr)
    for _, close in sinks:
        close()
    if hasattr(judge, "close"):
        judge.close()
    return rows


def _stack(lp_list, T: int) -> torch.Tensor:
    """Right-pad per-sequence log-prob tensors (keeping their grad) to [B, T]."""
    return torch.stack([torch.nn.functional.pad(x.float(), (0, T - x.shape[0])) for x in lp_list])

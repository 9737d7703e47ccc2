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
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from agentopd.config import SamplingConfig
from agentopd.diagnose import step_metrics
from agentopd.eval.heldout import heldout_eval
from agentopd.inference.hf import HFEngine
from agentopd.rl import distributed, objectives
from agentopd.rl.learner import (
    StepBatch,
    TurnRows,
    autocast,
    load_model,
    load_teacher,
    pick_device,
    precision,
    score,
    step_inputs,
    update,
)
from agentopd.rl.logprobs import lm_head_weight
from agentopd.rl.teacher import Teacher
from agentopd.rollout import DEFAULT_FEEDBACK, Sampling, env_specs, make_envs, rollout_chunks


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
    """The older form of ``env`` (kept working): ``env.id`` empty takes the env from here."""

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
class EnvConfig:
    id: str = ""
    """A registered Gymnasium env id: ``agentopd/Code-v0``, ``agentopd/Math-v0``,
    ``agentopd/HumanEval-v0``, or a user's (``package.module:Name-v0`` imports the module first).
    Empty: the env the older ``data`` section names (``data.env``, ``data.problems``, ...)."""
    kwargs: dict = field(default_factory=dict)
    """The env's arguments (agentopd's: problems, n, levels, seed, judge, backend, public_tests, ...;
    see agentopd.envs)."""
    heldout_kwargs: dict = field(default_factory=dict)
    """What the held-out env (``run.eval_problems``) changes in ``kwargs``; for generated problems
    the default is ``{split: heldout, n: run.eval_problems}``."""
    max_turns: int = 1
    """Turns per episode at most (agentopd's envs also get it as ``max_turns``): after a failed turn the
    env's critique is the next user message and the model answers again."""
    feedback: str = DEFAULT_FEEDBACK
    """The user message after a failed turn; ``{critique}`` is the env's observation."""
    discount: float = 1.0
    """Episode reward = the last turn's reward x discount ** (turns - 1) (RLEF's return)."""


@dataclass
class TeacherConfig:
    """The teacher that scores the student's own sampled tokens: which model it is (the student
    itself, a separate model, or a served one) and what it sees (``context``)."""

    model: str = ""
    """Which model: empty = the student itself (``mode`` says how); a checkpoint dir or hub id (or
    'micro-teacher', the shipped stronger micro model) = a separate frozen model with the student's
    tokenizer (vanilla on-policy distillation, OPD): loaded once, never trained, LoRA-free."""
    device: str = "auto"
    """The separate teacher model's device ('auto': the student's)."""
    dtype: str = "auto"
    """The separate teacher model's weights: 'auto' (bfloat16 on CUDA, float32 elsewhere),
    'float32', 'bfloat16' or 'float16'."""
    base_url: str = ""
    """A teacher behind an OpenAI-compatible server that returns prompt log-probs (vLLM's
    ``prompt_logprobs``), e.g. 'http://127.0.0.1:8000/v1'; the distillation divergence then runs over
    the teacher's top-``served_topk`` tokens plus a tail bucket."""
    served_model: str = ""
    """The served teacher's model name (``base_url``)."""
    served_topk: int = 20
    """Top-K log-probs asked of the served teacher at each position."""
    timeout: float = 120.0
    """Seconds per request to the served teacher (the client retries twice); a row that still fails
    has no teacher signal (masked and counted in ``teacher_errors``)."""
    context: list[str] = field(default_factory=lambda: ["feedback", "demonstration"])
    """What the teacher sees besides the prompt: 'feedback' (the judge's critique of a failed turn),
    'demonstration' (a successful sibling's answer), 'reference' (the problem's reference solution:
    OPSD); [] = the student's prompt as it is (vanilla OPD from a separate ``model``)."""
    mode: str = "ema"
    """The self-teacher (``model`` empty): ema, frozen, live or trust_region."""
    tau: float = 0.05
    """EMA rate."""
    mix: float = 0.5
    """trust_region: weight of the live model's logits."""
    max_tokens: int = 1024
    """Cap on the teacher prompt; critique, demonstration and reference are truncated to fit."""
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
    needs ``distill_alpha: 1``), 'mix' (``(1 - distill_weight) * pg + distill_weight * sdpo``) or
    'opd' (on-policy distillation: the per-token divergence to the teacher, reverse KL at
    ``distill_alpha: 1``, importance-weighted, plus the ``trust_region`` term)."""
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
    trust_region: float = 0.0
    """'opd': weight beta of a forward-KL trust region to the policy before the update,
    ``KL(pi_old || pi_theta)`` at each sampled token (its k3 estimate); it acts from the second
    optimizer step on a batch (``optim.epochs_per_batch`` > 1): at the first the two are equal."""
    is_clip: float = 2.0
    """'sdpo', 'sdpo_token', 'mix', 'opd': each distillation token's loss times the detached
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
    score_old: bool = False
    """Always score the old log-probs with a separate student forward before the update. Off: that
    forward is skipped where the update's own forward gives them exactly (agentopd.rl.learner.old_from_update)."""
    share_prompts: bool = True
    """Rows of a micro-batch that repeat a prompt (a group's student rows, its teacher contexts with
    the same demonstration) forward it once, then the responses on its repeated KV cache
    (agentopd.rl.logprobs.shared_prefix_hidden: the same log-probs and gradients up to float
    rounding); single process without gradient checkpointing only. Off: every row its own prompt."""
    logits_chunk: int = 128
    """Response positions per chunk of logits: the update and the scoring form the logits from the
    final hidden states this many positions at a time (recomputed in backward), never as a whole
    [B, R, V] tensor, for the policy log-probs and full-vocabulary distillation. 0: full [B, R, V]
    logits per micro-batch (more memory)."""


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
    eval_dense_steps: int = 0
    """Also evaluate after each of the first this many steps (rollouts to a target resolved to one
    step early in a run, where distillation gets there)."""
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
class EngineConfig:
    name: str = "hf"
    """What samples the rollouts: 'hf' (the learner itself, in this process) or 'vllm' (an offline
    vllm.LLM colocated on the learner's GPU, asleep during each update and synced with the new
    weights after it; extra agentopd[vllm]; see agentopd.inference.vllm)."""
    kwargs: dict = field(default_factory=dict)
    """More engine arguments. hf: batch_size. vllm: vllm.LLM's (gpu_memory_utilization: checked
    against what the learner needs, or chosen when unset; max_model_len, dtype, enforce_eager, ...)
    and the engine's own: sleep_level (2: weights and KV cache freed during the update, the default
    on CUDA; 0: off), headroom_gb (GPU memory kept free for the scoring passes; default 10%)."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    # allowed ranges of the numeric options (agentopd.config.check_ranges; others: >=0)
    RANGES: ClassVar[dict[str, str]] = {
        "data.n": ">=1", "sampling.group_size": ">=1", "sampling.prompts_per_step": ">=1",
        "sampling.max_new_tokens": ">=1", "sampling.temperature": ">0", "sampling.top_p": "(0,1]",
        "teacher.tau": "[0,1]", "teacher.mix": "[0,1]", "teacher.max_tokens": ">=1", "teacher.served_topk": ">=1",
        "teacher.timeout": ">0", "algo.clip_low": "[0,1)",
        "algo.entropy": "any", "algo.distill_alpha": "[0,1]", "optim.lr": ">0", "optim.micro_batch": ">=1",
        "optim.epochs_per_batch": ">=1", "run.steps": ">=1", "run.seed": "any", "run.eval_samples": ">=1",
        "env.max_turns": ">=1", "env.discount": "[0,1]"}


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
    _check_teacher(cfg)
    _check_loss(cfg.algo)
    env_specs(cfg)
    _check_judge_spec(cfg.data.judge)
    if isinstance(cfg.env.kwargs.get("judge"), dict):
        _check_judge_spec(cfg.env.kwargs["judge"])
    precision(cfg)
    if cfg.engine.name not in ("hf", "vllm"):
        raise ConfigError(f"engine.name: {cfg.engine.name!r}; choices: hf, vllm")
    if cfg.engine.name == "vllm":  # missing or too old: one line before any work
        from agentopd.inference.vllm import require_vllm

        require_vllm()


def _check_teacher(cfg: TrainConfig) -> None:
    """The teacher settings, and a separate teacher's tokenizer against the student's (before any
    model loads: token-level distillation needs the same tokens)."""
    from agentopd.config import ConfigError
    from agentopd.rl.teacher import CONTEXT_SOURCES, TEACHER_MODES

    t = cfg.teacher
    if t.mode not in TEACHER_MODES:
        raise ConfigError(f"teacher.mode: {t.mode!r}; choices: {', '.join(TEACHER_MODES)}")
    bad = [c for c in t.context if c not in CONTEXT_SOURCES]
    if bad or len(set(t.context)) != len(t.context):
        raise ConfigError(f"teacher.context: {t.context}; a list of distinct {', '.join(CONTEXT_SOURCES)} (or [])")
    if t.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"teacher.dtype: {t.dtype!r}; choices: auto, float32, bfloat16, float16")
    if t.model and t.base_url:
        raise ConfigError("teacher.model and teacher.base_url both set: name one teacher")
    if t.base_url and not t.served_model:
        raise ConfigError("teacher.base_url needs teacher.served_model (the model name the server serves)")
    if not (t.model or t.base_url or t.context):
        raise ConfigError("teacher.context=[] shows the self-teacher nothing the student did not see: name a "
                          "teacher.model (or teacher.base_url), or a context source")
    if t.model:
        _check_teacher_tokenizer(cfg.model.path, t.model, cfg.run.seed)
    if t.base_url:  # the server's /tokenize against the student's tokenizer (a warning where it has none)
        from agentopd.inference import load_tokenizer
        from agentopd.rl.served import ServedTeacher

        try:
            ServedTeacher(t.base_url, t.served_model, timeout=t.timeout).check_tokenizer(
                load_tokenizer(cfg.model.path, cfg.run.seed))
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_teacher_tokenizer(student: str, teacher: str, seed: int) -> None:
    from agentopd.config import ConfigError
    from agentopd.inference import load_tokenizer
    from agentopd.rl.teacher import tokenizer_mismatch

    try:
        teacher_tok = load_tokenizer(teacher, seed)
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher.model: cannot load {teacher!r}: {str(e).splitlines()[0]}") from None
    why = tokenizer_mismatch(load_tokenizer(student, seed), teacher_tok)
    if why:
        raise ConfigError(f"teacher.model {teacher!r} and model.path {student!r} have different tokenizers "
                          f"({why}): token-level distillation needs the same tokenizer")


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


def _metric_sinks(cfg: TrainConfig):
    """The places besides metrics.jsonl that the metrics rows go to, their packages checked now (a
    ConfigError before the model loads): ``open(start)`` gives ``[(log(row), close())]`` once the
    step the run starts from is known. On resume the steps after ``start`` are redone, so
    TensorBoard hides its events from step ``start + 1`` on and wandb goes on with the same run."""
    tb = _needs("torch.utils.tensorboard", "run.tensorboard", "tensorboard") if cfg.run.tensorboard else None
    wandb = _needs("wandb", "run.wandb", "wandb") if cfg.run.wandb else None

    def open_(start: int) -> list:
        return ([_tensorboard_sink(tb, cfg, start)] if tb else []) + ([_wandb_sink(wandb, cfg, start)] if wandb else [])
    return open_


def _tensorboard_sink(tb, cfg: TrainConfig, start: int):
    """``SummaryWriter(purge_step=...)``: with ``run.resume``, the events at steps the run redoes
    (after ``start``; all of them, step 0's held-out row too, when it starts over) are hidden."""
    purge = (start + 1 if start else 0) if cfg.run.resume else None
    writer = tb.SummaryWriter(os.path.join(cfg.run.out, "tb"), purge_step=purge)

    def log_tb(row):
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                writer.add_scalar(k, v, row["step"])
    return log_tb, writer.close


def _wandb_sink(wandb, cfg: TrainConfig, start: int):
    """A wandb run whose id and last logged step are kept in ``run.out/wandb.json``: a run resumed
    from a checkpoint (``start > 0``) goes on with the same wandb run (``resume="allow"``) and logs
    only the steps after the last one it logged (wandb cannot take a step back; the redone steps'
    rows are those of the run that was cut, as resume is exact); otherwise a new wandb run."""
    import uuid

    path = os.path.join(cfg.run.out, "wandb.json")
    state = {"id": uuid.uuid4().hex[:16], "step": -1}
    if cfg.run.resume and start and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            state.update(json.load(f))

    def save():
        with open(path, "w", encoding="utf-8") as f:
            json.dump(state, f)

    save()
    run = wandb.init(project=cfg.run.wandb, config=dataclasses.asdict(cfg), dir=cfg.run.out, id=state["id"],
                     resume="allow")

    def log_wandb(row):
        if row["step"] > state["step"]:
            run.log(row, step=row["step"])
            state["step"] = row["step"]
            save()
    return log_wandb, run.finish


def _engine(cfg: TrainConfig):
    """``build(model, tokenizer, device)``: the rollout engine ``engine.name`` names."""
    if cfg.engine.name == "vllm":
        from agentopd.inference.vllm import VLLMEngine

        return VLLMEngine.colocated(cfg.model.path, os.path.join(cfg.run.out, "base"), seed=cfg.run.seed,
                                    **cfg.engine.kwargs)
    return lambda model, tok, device: HFEngine(model, tok, device=device, **cfg.engine.kwargs)


# --------------------------------------------------------------------------------- the loop


def _rollouts(cfg: TrainConfig, engine, tok, venvs: list, starts: list, step: int, amp, t: dict) -> list:
    """1-2. One episode per slot: ``starts`` the step's problems (indices, or reset seeds for an env
    that does not pick by index), ``group_size`` episodes each, chunk by chunk of problems (a chunk's
    judging runs while the next one generates; a failed or crashed sample never aborts the step).
    ``t``: generate, execute (judging not hidden behind generation), execute_total."""
    G, per_call = cfg.sampling.group_size, cfg.sampling.generate_chunk or len(starts)
    key = "index" if hasattr(venvs[0], "problems") else "seeds"
    chunks = [{key: [s for s in starts[c:c + per_call] for _ in range(G)],
               "seed": cfg.run.seed * 1_000_003 + step + k * 1_000_000_007}
              for k, c in enumerate(range(0, len(starts), per_call))]
    s = cfg.sampling
    episodes, timing = rollout_chunks(engine, tok, venvs, chunks, group_size=G, max_turns=cfg.env.max_turns,
                                      sampling=Sampling(s.max_new_tokens, s.temperature, s.top_p),
                                      feedback=cfg.env.feedback, context=amp)  # as the held-out evaluation samples
    t["generate"] += timing.generate
    t["execute_total"] += timing.step
    t["execute"] = max(timing.extra["wall"] - timing.generate, 0.0)
    return episodes


def _envs(cfg: TrainConfig, judge):
    """The training vector envs (one per chunk of prompts) and the held-out one (or None); a judge
    given to ``train`` replaces the env's (agentopd's envs)."""
    env_id, kw, held_kw = env_specs(cfg)
    if judge is not None and env_id.startswith("agentopd/"):
        kw["judge"] = judge
    P, G = cfg.sampling.prompts_per_step // distributed.world(), cfg.sampling.group_size  # this rank's prompts
    per_call = cfg.sampling.generate_chunk or P
    venvs = make_envs(env_id, kw, [min(per_call, P - c) * G for c in range(0, P, per_call)])
    if held_kw is None:
        return venvs, None
    shared = getattr(venvs[0], "env", None)  # agentopd's env: one judge (one sandbox pool) for both
    if shared is not None and "judge" not in cfg.env.heldout_kwargs:
        held_kw["judge"] = shared.judge
    heldout = make_envs(env_id, held_kw, [cfg.run.eval_problems * cfg.run.eval_samples])[0]
    if shared is not None and held_kw.get("judge") is shared.judge:
        heldout.owner = False  # the training envs close the judge
    return venvs, heldout


def _close(venvs: list, heldout) -> None:
    for v in [*venvs, *([heldout] if heldout is not None else [])]:
        v.close()


def _row(step: int, episodes: list, rows: TurnRows, st: StepBatch, t: dict, update: tuple, rollout_metrics: dict) -> dict:
    """The step's metrics row (before any held-out evaluation): rewards and pass rate per episode
    (its last turn), the rest per turn."""
    from agentopd.judges import reward_stats

    success_B = torch.tensor(rows.success)
    loss_sum, sums, gnorm = update
    resp_ids, mask_BT, adv_BT = st.response_ids, st.mask_BT, st.adv_BT
    ls_BT, lt_BT, tmask_B = st.old_BT, st.teacher_BT, st.teacher_mask_B
    n_resp = sum(len(r) for r in resp_ids)
    m = mask_BT.bool()
    row = {"step": step, **reward_stats([e.turns[-1].judgement for e in episodes]), "loss": loss_sum, **sums,
           **rollout_metrics, "grad_norm": gnorm,
           "adv_mean": float(adv_BT[m].mean()) if m.any() else 0.0,
           "adv_std": float(adv_BT[m].std()) if m.sum() > 1 else 0.0,
           "kl_teacher": float(((ls_BT - lt_BT) * mask_BT * tmask_B[:, None]).sum()
                               / (mask_BT * tmask_B[:, None]).sum().clamp(min=1)),
           "teacher_signal_frac": float(tmask_B.mean()), "turns_mean": len(rows.turns) / max(len(episodes), 1),
           "response_len": n_resp / max(len(resp_ids), 1), "empty_responses": sum(len(r) == 0 for r in resp_ids),
           "tokens_per_s": n_resp / max(t["generate"], 1e-9), **{f"time_{k}": v for k, v in t.items()}}
    return row | step_metrics(ls_BT, lt_BT, mask_BT, tmask_B, success_B)  # teacher_auc, ratio_correct/wrong


@dataclass
class _Parts:
    """What every step uses: the model and its optimizer, teacher, reference, engine and envs."""

    model: object
    tok: object
    opt: object
    teacher: object
    ref: object
    engine: object
    venvs: list
    heldout: object
    amp: object
    head_VH: object
    chunk: int


def _contexts(cfg: TrainConfig, tok, episodes: list, rows: TurnRows) -> list | None:
    """3a. Each turn's teacher context (``teacher.context``: its critique in hindsight, a successful
    sibling episode's final answer, the problem's reference solution, or the turn's own prompt):
    ContextRows, or None where the algorithm needs no teacher (grpo / rloo)."""
    from agentopd.rl.teacher import TeacherTemplate, context_rows, reference_text

    if not (cfg.algo.advantage in ("sd_token", "sd_to_go", "hybrid") or objectives.needs(cfg.algo)):
        return None
    first = {e.group: e for e in reversed(episodes)}  # each group's first episode
    groups = [first[g] for g in sorted(first)]
    return context_rows(tok, [e.prompt for e in groups], rows.turns, [t.judgement for t in rows.turns],
                        cfg.sampling.group_size, cfg.teacher, TeacherTemplate(), rows.episodes,
                        [(e.turns[-1].text, e.success) for e in episodes],
                        [reference_text(e.privileged, e.kind) for e in groups], rows.prompt_ids)


def _step(cfg: TrainConfig, k: _Parts, step: int, starts: list) -> tuple[dict, list, TurnRows, list | None, StepBatch]:
    """One training step on the problems ``starts``: ``(metrics row, episodes, rows, contexts, batch)``."""
    t = {"generate": 0.0, "execute": 0.0, "execute_total": 0.0, "score": 0.0, "update": 0.0}
    k.model.eval()
    episodes = _rollouts(cfg, k.engine, k.tok, k.venvs, starts, step, k.amp, t)
    rows = TurnRows.of(episodes, cfg.env.discount)
    t0 = time.perf_counter()  # 3. self-teacher: critique (+ a successful sibling), the same ids re-scored
    ctx = _contexts(cfg, k.tok, episodes, rows)
    teacher_prompts = [c.ids for c in ctx] if ctx else [None] * len(rows.turns)
    scores = score(cfg, k.model, k.teacher, k.ref, k.amp, rows, teacher_prompts)
    t["score"] = time.perf_counter() - t0
    st, rollout_metrics = step_inputs(cfg, rows, teacher_prompts, scores)
    if hasattr(k.engine, "sleep"):  # vllm: its weights and KV cache freed for the update
        k.engine.sleep()
    t0 = time.perf_counter()
    upd = update(cfg, k.model, k.opt, k.teacher, k.head_VH, k.chunk, k.amp, st)
    t["update"] = time.perf_counter() - t0
    if hasattr(k.engine, "sync"):  # vllm: awake with the new weights, once per step (not in time_generate)
        t0 = time.perf_counter()
        k.engine.sync(k.model)
        t["sync"] = time.perf_counter() - t0
    return _row(step + 1, episodes, rows, st, t, upd, rollout_metrics), episodes, rows, ctx, st


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


def _setup(cfg: TrainConfig, engine, judge) -> _Parts:
    """Seeds, device, the envs (their problems and judge checked before the model loads), the model,
    its optimizer, teacher, reference and engine."""
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    device = pick_device(cfg)
    venvs, heldout = _envs(cfg, judge)  # a bad problems file fails before the model loads
    try:
        model, tok = load_model(cfg, device)
    except BaseException:
        _close(venvs, heldout)
        raise
    head_VH = lm_head_weight(model)
    chunk = cfg.optim.logits_chunk if head_VH is not None else 0  # hidden states, logits chunk by chunk
    teacher = load_teacher(cfg, model, device)
    ref = Teacher(model, "frozen") if cfg.algo.ref_kl else None
    distributed.wrap(cfg, model, teacher, ref, device)  # torchrun: FSDP2 or DDP (the optimizer sees the shards)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                            weight_decay=cfg.optim.weight_decay)
    engine = distributed.engine((engine or _engine(cfg))(model, tok, device=device), model)
    return _Parts(model, tok, opt, teacher, ref, engine, venvs, heldout, autocast(precision(cfg), device), head_VH, chunk)


def _starts(cfg: TrainConfig, venv, data_pos: int) -> list:
    """The step's problems: positions in a fixed shuffle of the env's problems, or, for an env that does
    not list them, reset seeds (one per problem)."""
    P = cfg.sampling.prompts_per_step
    if not hasattr(venv, "problems"):
        return [cfg.run.seed * 1_000_003 + data_pos + i for i in range(P)]
    order = np.random.default_rng(cfg.run.seed).permutation(len(venv.problems)).tolist()
    return [order[(data_pos + i) % len(order)] for i in range(P)]


def _evaluate(cfg: TrainConfig, k: _Parts) -> dict:
    """Held-out pass@1 (and per turn), the same seed every time: differences come from the model."""
    from agentopd.envs.procedural import HELDOUT_SEED

    k.model.eval()
    n = min(cfg.run.eval_problems, len(getattr(k.heldout, "problems", [None] * cfg.run.eval_problems)))
    with distributed.gathered(k.model), k.amp():  # rank 0 alone evaluates
        got = (heldout_eval(k.engine, k.tok, k.heldout, n, cfg.run.eval_samples, cfg.sampling, HELDOUT_SEED,
                            cfg.env.max_turns, cfg.env.feedback) if distributed.is_main() else None)
    return distributed.broadcast(got)


def _eval_due(run: RunConfig, step: int, last: bool) -> bool:
    """Whether the held-out evaluation runs after ``step`` (1-based)."""
    return last or step <= run.eval_dense_steps or bool(run.eval_every) and step % run.eval_every == 0


def train(cfg: TrainConfig, engine=None, judge=None) -> list[dict]:
    """Run ``cfg.run.steps`` steps; returns the metrics rows (also appended to metrics.jsonl).
    ``engine`` / ``judge``: use these instead of the ones the config names (an engine is built
    around the model by ``engine(model, tokenizer, device)`` when it is a callable class)."""
    from tqdm import tqdm

    from agentopd import jsonl
    from agentopd import samples as sample_log
    from agentopd.rl import checkpoints
    from agentopd.threads import configure_torch

    _check_algo(cfg)
    distributed.setup(cfg)  # torchrun: the process group; progress off on ranks > 0
    os.makedirs(cfg.run.out, exist_ok=True)
    open_sinks = _metric_sinks(cfg) if distributed.is_main() else (lambda start: [])
    k = _setup(cfg, engine, judge)
    shared = getattr(getattr(k.venvs[0], "env", None), "judge", None)  # judging overlaps generation: its workers
    configure_torch(getattr(shared, "workers", 1) if cfg.sampling.generate_chunk else 0)  # agentopd.threads
    ckpt_dir = os.path.join(cfg.run.out, "checkpoints")
    start, data_pos = _resume(cfg, ckpt_dir, k.model, k.opt, k.teacher, next(k.model.parameters()).device)
    if start and hasattr(k.engine, "sync"):  # vllm: the resumed weights
        k.engine.sync(k.model)
    sinks = open_sinks(start)
    rows = []

    def log(row: dict) -> None:
        rows.append(row)
        if not distributed.is_main():
            return
        jsonl.append(os.path.join(cfg.run.out, "metrics.jsonl"), [row])
        for sink, _ in sinks:
            sink(row)

    if k.heldout is not None and start == 0:
        log({"step": 0, **_evaluate(cfg, k)})
    bar = tqdm(range(start, cfg.run.steps), initial=start, total=cfg.run.steps, desc="train",
               disable=not cfg.run.progress)
    for step in bar:
        starts = distributed.rank_share(_starts(cfg, k.venvs[0], data_pos))  # torchrun: this rank's (whole groups)
        row, episodes, trows, ctx, st = _step(cfg, k, step, starts)
        data_pos += cfg.sampling.prompts_per_step
        last = step + 1 == cfg.run.steps
        if k.heldout is not None and _eval_due(cfg.run, step + 1, last):
            row |= _evaluate(cfg, k)
        if distributed.is_main():
            sample_log.record(cfg, step + 1, last, "heldout_pass1" in row, k.tok, episodes, trows, ctx, st)
        log(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl_teacher']:.3f}")
        if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0 or last:
            saved = checkpoints.save(ckpt_dir, step + 1, k.model, k.tok, k.opt, k.teacher, data_pos, cfg.run.save_merged)
            if last:
                checkpoints.export_final(saved, os.path.join(cfg.run.out, "final"))
    if distributed.is_main():
        _summary(cfg, rows)
    for _, close in sinks:
        close()
    _close(k.venvs, k.heldout)
    distributed.teardown()
    return rows


def _summary(cfg: TrainConfig, rows: list[dict]) -> None:
    """The held-out pass@1 before and after, on stderr (and per turn, multi-turn)."""
    from tqdm import tqdm

    evals = [r for r in rows if "heldout_pass1" in r]
    if not evals or "heldout_pass1" not in rows[-1]:
        return
    was = f"{evals[0]['heldout_pass1']:.3f} -> " if evals[0]["step"] == 0 and len(evals) > 1 else ""
    msg = f"held-out pass@1 ({cfg.run.eval_problems} problems x {cfg.run.eval_samples}): {was}{rows[-1]['heldout_pass1']:.3f}"
    if "heldout_pass_after_turn" in rows[-1]:
        per = lambda r: " ".join(f"{p:.3f}" for p in r["heldout_pass_after_turn"])  # noqa: E731
        msg += f"; after each turn: {per(evals[0]) + ' -> ' if was else ''}{per(rows[-1])}"
    tqdm.write(msg, file=sys.stderr)



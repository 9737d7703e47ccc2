"""The training loop: rollouts → judges → teacher → advantages → policy-gradient update.

One readable file in the spirit of CleanRL: ``train(cfg)`` over the one configuration
(:class:`agentopd.config.Config`, a docstring per option: ``agentopd train --help``). Every stage is
a plain call on plain data; token ids are the source of truth from sampling to the update.
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

import numpy as np
import torch

from agentopd import faults
from agentopd.config import Config, ConfigError, EvalConfig, check_arguments
from agentopd.diagnose import step_metrics
from agentopd.eval.heldout import heldout_eval
from agentopd.inference.hf import HFEngine
from agentopd.rl import distributed, objectives
from agentopd.rl.guard import Guard
from agentopd.rl.learner import (
    Batch,
    TurnRows,
    Update,
    learner_temperature,
    make_batch,
    rollout_correction,
    score,
    update,
)
from agentopd.rl.logprobs import lm_head_weight
from agentopd.rl.models import (
    autocast,
    load_model,
    load_teacher,
    pick_device,
    precision,
)
from agentopd.rl.offpolicy import ReplayCache
from agentopd.rl.teacher import Teacher
from agentopd.rollout import Sampling, env_specs, make_envs, rollout_chunks

# ------------------------------------------------------------------------------------ helpers


def check(cfg: Config, load: bool = True) -> None:
    """What the config's types and ranges cannot say, checked before any work: the estimator and
    its arguments, the objective, the teacher (a separate teacher's tokenizer against the student's),
    the env and its judge, the engine. ``load=False`` (the dry run, agentopd.plan) skips what needs
    the tokenizers or vLLM installed."""
    from agentopd.rl import advantages

    if cfg.algo.advantage not in advantages.ADVANTAGES:
        raise ConfigError(f"algo.advantage: unknown estimator {cfg.algo.advantage!r}; "
                          f"choices: {', '.join(sorted(advantages.ADVANTAGES))}")
    check_arguments(advantages.ADVANTAGES[cfg.algo.advantage], cfg.algo.advantage_kwargs, "algo.advantage_kwargs",
                    cfg.algo.advantage, reserved=("inputs",))
    _check_teacher(cfg, load)
    _check_loss(cfg.algo)
    _check_offpolicy(cfg)
    check_env_id(cfg.env.id)
    _check_env_arguments(cfg)
    if cfg.engine.name == "hf":
        check_arguments(HFEngine, cfg.engine.kwargs, "engine.kwargs", "the hf engine",
                        reserved=("model", "tokenizer", "device", "batch_size"))
    if cfg.engine.name == "openai":
        raise ConfigError("engine.name: openai samples for eval model and rlef; training needs hf or vllm")
    if cfg.engine.name == "vllm" and load:  # missing or too old: one line before any work
        from agentopd.inference.vllm import require_vllm

        require_vllm()


def _check_env_arguments(cfg: Config) -> None:
    """``env.kwargs`` (and the held-out env's) against the env's constructor, and its judge spec."""
    import gymnasium as gym
    from gymnasium.envs.registration import load_env_creator

    env_id, kw, held = env_specs(cfg)
    entry = gym.spec(env_id).entry_point
    make = load_env_creator(entry) if isinstance(entry, str) else entry
    for where, given in (("env.kwargs", kw), ("env.heldout_kwargs", held or {})):
        check_arguments(make, given, where, env_id, skip=("judge",))
        if "judge" in given:
            _check_judge_spec(given["judge"], f"{where}.judge")


def check_env_id(env_id: str) -> None:
    """A registered Gymnasium id (``package.module:Name-v0`` imports the module first), else a
    ConfigError naming the nearest registered one."""
    import difflib

    import gymnasium as gym

    import agentopd.envs  # noqa: F401  (registers agentopd's ids)

    try:
        gym.spec(env_id)
    except Exception as e:  # gymnasium's NameNotFound, VersionNotFound, a module that does not import
        close = difflib.get_close_matches(env_id, list(gym.registry), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"env.id: {env_id!r} is not a registered env ({type(e).__name__}){hint}") from None


def _check_teacher(cfg: Config, load: bool = True) -> None:
    """The teacher settings, and a separate teacher's tokenizer against the student's (before any
    model loads: token-level distillation needs the same tokens)."""
    t = cfg.teacher
    if len(set(t.context)) != len(t.context):
        raise ConfigError(f"teacher.context: {t.context}: each source once")
    if t.model and t.base_url:
        raise ConfigError("teacher.model and teacher.base_url both set: name one teacher")
    if t.base_url and not t.served_model:
        raise ConfigError("teacher.base_url needs teacher.served_model (the model name the server serves)")
    if not (t.model or t.base_url or t.context):
        raise ConfigError("teacher.context=[] shows the self-teacher nothing the student did not see: name a "
                          "teacher.model (or teacher.base_url), or a context source")
    if t.model and load:
        _check_teacher_tokenizer(cfg.model.path, t.model, cfg.run.seed)
    if t.base_url and load:  # the server's /tokenize against the student's tokenizer (a warning where it has none)
        from agentopd.inference import load_tokenizer
        from agentopd.rl.served import ServedTeacher

        try:
            ServedTeacher(t.base_url, t.served_model, timeout=t.timeout).check_tokenizer(
                load_tokenizer(cfg.model.path, cfg.run.seed))
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_teacher_tokenizer(student: str, teacher: str, seed: int) -> None:
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


def _check_loss(algo) -> None:
    if algo.loss not in objectives.OBJECTIVES:
        raise ConfigError(f"algo.loss: unknown objective {algo.loss!r}; choices: {', '.join(sorted(objectives.OBJECTIVES))}")
    if algo.loss == "sdpo_token" and algo.distill_alpha != 1.0:  # as TRL: the sampled-token form is reverse KL only
        raise ConfigError(f"algo.loss=sdpo_token is reverse KL only: it needs algo.distill_alpha=1, got {algo.distill_alpha}")
    if algo.loss == "mix" and not 0.0 <= algo.distill_weight <= 1.0:
        raise ConfigError(f"algo.loss=mix needs algo.distill_weight in [0, 1], got {algo.distill_weight}")


def _check_offpolicy(cfg: Config) -> None:
    """Rollout reuse and asynchronous rollouts: importance weights on, one process, the hf engine."""
    stale = cfg.optim.reuse.max_age or cfg.run.async_steps
    if stale and cfg.algo.rollout_is_clip <= 0:
        raise ConfigError(f"{'optim.reuse.max_age' if cfg.optim.reuse.max_age else 'run.async_steps'} needs "
                          f"algo.rollout_is_clip > 0 (the truncation of the importance weights), got {cfg.algo.rollout_is_clip}")
    if cfg.run.async_steps and cfg.engine.name != "hf":
        raise ConfigError(f"run.async_steps runs the hf engine in a process of its own; engine.name={cfg.engine.name} "
                          "is not supported with it yet (set run.async_steps=0)")
    if cfg.run.async_steps and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("run.async_steps runs in one process: not under torchrun yet (set run.async_steps=0)")


def _check_judge_spec(spec, where: str = "env.kwargs.judge") -> None:
    """The judge a config names exists and takes its arguments (before any model loads): a name, or
    a mapping with one and the judge's arguments (checked by name and type)."""
    from agentopd.judges import resolve

    try:
        if isinstance(spec, str):
            name = spec
        elif isinstance(spec, dict):
            name = spec.get("name") or spec.get("type")
            if spec and not name:
                raise ValueError(f"judge config {spec} needs a 'name'")
        else:
            raise ValueError(f"a judge name or a mapping {{name: ..., ...}}, got {spec!r}")
        judge = resolve(name) if name else None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if judge is not None and isinstance(spec, dict):
        check_arguments(judge, {k: v for k, v in spec.items() if k not in ("name", "type")}, where, name)


def _needs(module: str, option: str, package: str):
    """``module`` imported, or a ConfigError that names the option and how to install the package."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{option} needs the {package} package: pip install {package}") from None


def _metric_sinks(cfg: Config):
    """The places besides metrics.jsonl that the metrics rows go to, their packages checked now (a
    ConfigError before the model loads): ``open(start)`` gives ``[(log(row), close())]`` once the
    step the run starts from is known. On resume the steps after ``start`` are redone, so
    TensorBoard hides its events from step ``start + 1`` on and wandb goes on with the same run."""
    tb = _needs("torch.utils.tensorboard", "run.tensorboard", "tensorboard") if cfg.run.tensorboard else None
    wandb = _needs("wandb", "run.wandb", "wandb") if cfg.run.wandb else None

    def open_(start: int) -> list:
        return ([_tensorboard_sink(tb, cfg, start)] if tb else []) + ([_wandb_sink(wandb, cfg, start)] if wandb else [])
    return open_


def _tensorboard_sink(tb, cfg: Config, start: int):
    """``SummaryWriter(purge_step=...)``: with ``run.resume``, the events at steps the run redoes
    (after ``start``; all of them, step 0's held-out row too, when it starts over) are hidden."""
    purge = (start + 1 if start else 0) if cfg.run.resume else None
    writer = tb.SummaryWriter(os.path.join(cfg.run.out, "tb"), purge_step=purge)

    def log_tb(row):
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                writer.add_scalar(k, v, row["step"])
    return log_tb, writer.close


def _wandb_sink(wandb, cfg: Config, start: int):
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
        faults.write_text(path, json.dumps(state))

    save()
    run = wandb.init(project=cfg.run.wandb, config=cfg.model_dump(), dir=cfg.run.out, id=state["id"],
                     resume="allow")

    def log_wandb(row):
        if row["step"] > state["step"]:
            run.log(row, step=row["step"])
            state["step"] = row["step"]
            save()
    return log_wandb, run.finish


def _engine(cfg: Config):
    """``build(model, tokenizer, device)``: the rollout engine ``engine.name`` names."""
    if cfg.engine.name == "vllm":
        from agentopd.inference.vllm import VLLMEngine

        return VLLMEngine.colocated(cfg.model.path, os.path.join(cfg.run.out, "base"), seed=cfg.run.seed,
                                    **cfg.engine.kwargs)
    return lambda model, tok, device: HFEngine(model, tok, device=device, batch_size=cfg.engine.batch_size,
                                               **cfg.engine.kwargs)


# --------------------------------------------------------------------------------- the loop


def _rollouts(cfg: Config, engine, tok, venvs: list, starts: list, step: int, amp, t: dict) -> list:
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


def _envs(cfg: Config, judge):
    """The training vector envs (one per chunk of prompts) and the held-out one (or None); a judge
    given to ``train`` replaces the env's (agentopd's envs)."""
    env_id, kw, held_kw = env_specs(cfg)
    if judge is not None and env_id.startswith("agentopd/"):
        kw["judge"] = judge
    P, G = cfg.sampling.prompts_per_step // distributed.world(), cfg.sampling.group_size  # this rank's prompts
    per_call = cfg.sampling.generate_chunk or P
    venvs = make_envs(env_id, kw, [min(per_call, P - c) * G for c in range(0, P, per_call)])
    shared = getattr(venvs[0], "env", None)  # agentopd's env: one judge (one sandbox pool) for both
    if shared is not None:  # an outage is retried (agentopd.faults)
        r = cfg.run
        shared.judge = faults.RetryingJudge(shared.judge, r.max_error_rate, r.service_retries, r.retry_backoff_s)
    if held_kw is None:
        return venvs, None
    if shared is not None and "judge" not in cfg.env.heldout_kwargs:
        held_kw["judge"] = shared.judge
    heldout = make_envs(env_id, held_kw, [cfg.eval.problems * cfg.eval.samples])[0]
    if shared is not None and held_kw.get("judge") is shared.judge:
        heldout.owner = False  # the training envs close the judge
    return venvs, heldout


def _close(venvs: list, heldout) -> None:
    for v in [*venvs, *([heldout] if heldout is not None else [])]:
        v.close()


def _row(step: int, episodes: list, rows: TurnRows, batch: Batch, upd: Update, t: dict) -> dict:
    """The step's metrics row (before any held-out evaluation): rewards and pass rate per episode
    (its last turn), the rest per turn."""
    from agentopd.envs.agent import episode_tool_metrics
    from agentopd.judges import reward_stats

    success_B = torch.tensor(rows.success)
    resp_ids, mask_BT, adv_BT = batch.response_ids, batch.mask_BT, upd.adv_BT
    ls_BT, lt_BT, tmask_B = upd.old_BT, batch.teacher_BT, batch.teacher_mask_B
    n_resp = sum(len(r) for r in resp_ids)
    m = mask_BT.bool()
    row = {"step": step, **reward_stats([e.turns[-1].judgement for e in episodes]), "loss": upd.loss, **upd.metrics,
           "teacher_errors": batch.teacher_errors, **upd.rollout_metrics, "grad_norm": upd.grad_norm,
           "adv_mean": float(adv_BT[m].mean()) if m.any() else 0.0,
           "adv_std": float(adv_BT[m].std()) if m.sum() > 1 else 0.0,
           "kl_teacher": float(((ls_BT - lt_BT) * mask_BT * tmask_B[:, None]).sum()
                               / (mask_BT * tmask_B[:, None]).sum().clamp(min=1)),
           "teacher_signal_frac": float(tmask_B.mean()), "turns_mean": len(rows.turns) / max(len(episodes), 1),
           "response_len": n_resp / max(len(resp_ids), 1), "empty_responses": sum(len(r) == 0 for r in resp_ids),
           "entropy": _entropy(batch), "tokens_per_s": n_resp / max(t["generate"], 1e-9),
           **({"update_skipped": upd.skipped} if upd.skipped else {}), **{f"time_{k}": v for k, v in t.items()}}
    row |= episode_tool_metrics(episodes)  # an agent env's: tool_calls_mean, tool_errors, ...
    return row | step_metrics(ls_BT, lt_BT, mask_BT, tmask_B, success_B)  # teacher_auc, ratio_correct/wrong


def _entropy(batch: Batch) -> float | None:
    """The sampling entropy per token, estimated by the mean of the sampled tokens' negative
    log-probs under the engine (None: the engine gave none)."""
    m_BT = batch.engine_mask_BT
    return float(-(batch.engine_BT * m_BT).sum() / m_BT.sum()) if m_BT.sum() > 0 else None


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
    cache: object = None  # agentopd.rl.offpolicy.ReplayCache (optim.reuse)
    pipeline: object = None  # agentopd.async_rollouts.AsyncRollouts (run.async_steps), made once the start is known
    worker: object = None  # its engine process (agentopd.inference.worker), started before the model loads


def _contexts(cfg: Config, tok, episodes: list, rows: TurnRows) -> list | None:
    """3a. Each turn's teacher context (``teacher.context``: its critique in hindsight, a successful
    sibling episode's final answer, the problem's reference solution, or the turn's own prompt):
    ContextRows, or None where the algorithm needs no teacher (grpo / rloo)."""
    from agentopd.rl.teacher import (
        TeacherTemplate,
        context_rows,
        conversation_tails,
        reference_text,
    )

    if not objectives.needs_teacher(cfg.algo):
        return None
    first = {e.group: e for e in reversed(episodes)}  # each group's first episode
    groups = [first[g] for g in sorted(first)]
    return context_rows(tok, [e.prompt for e in groups], rows.turns, [t.judgement for t in rows.turns],
                        cfg.sampling.group_size, cfg.teacher, TeacherTemplate(), rows.episodes,
                        [(e.turns[-1].text, e.success) for e in episodes],
                        [reference_text(e.privileged, e.kind) for e in groups], rows.prompt_ids,
                        conversation_tails(episodes, rows.episodes, rows.turn_index))  # agent turns: in context


@dataclass
class StepResult:
    """One training step: its metrics row, episodes, their learner rows, each row's teacher context
    (None: no teacher), the batch the update read and what it computed."""

    row: dict
    episodes: list
    rows: TurnRows
    contexts: list | None
    batch: Batch
    update: Update


@dataclass
class Prepared:
    """Steps 1-4, which change no training state (a stop signal may abandon them): the episodes,
    their learner rows, each row's teacher context, the batch and the stage times so far."""

    episodes: list
    rows: TurnRows
    contexts: list | None
    batch: Batch
    t: dict
    age: int = 0  # the updates between the weights that sampled the rollouts and the learner's (run.async_steps)


def _prepare(cfg: Config, k: _Parts, step: int, starts: list) -> Prepared:
    """Rollouts on the problems ``starts``, teacher contexts, scoring and the batch."""
    t = {"generate": 0.0, "execute": 0.0, "execute_total": 0.0, "score": 0.0, "update": 0.0, "sync": 0.0}
    k.model.eval()
    age = 0
    if k.pipeline is None:
        episodes = _rollouts(cfg, k.engine, k.tok, k.venvs, starts, step, k.amp, t)
    else:  # generated while earlier updates ran
        episodes, timing, age, t["rollout_wait"] = k.pipeline.take(step, k.model)
        t |= {key: timing[key] for key in ("generate", "execute", "execute_total")}
    rows = TurnRows.of(episodes, cfg.env.discount)
    t0 = time.perf_counter()  # 3. the teacher: its context, the same ids re-scored
    ctx = _contexts(cfg, k.tok, episodes, rows)
    teacher_prompts = [c.ids for c in ctx] if ctx else [None] * len(rows.turns)
    scores = score(cfg.algo, cfg.optim, learner_temperature(cfg.sampling), k.model, k.teacher, k.ref, k.amp, rows,
                   teacher_prompts)
    t["score"] = time.perf_counter() - t0
    batch = make_batch(cfg.algo, rows, teacher_prompts, scores)
    if age:  # sampled by older weights: corrected as cached rows are
        batch = dataclasses.replace(batch, stale_B=torch.ones(len(batch.response_ids)))
    return Prepared(episodes, rows, ctx, batch, t, age)


def _learn(cfg: Config, k: _Parts, step: int, prep: Prepared) -> StepResult:
    """5. The update, the teacher's own update (not after a skipped update) and the engine's sync."""
    t = prep.t
    k.engine.sleep()  # vllm: its weights and KV cache freed for the update
    t0 = time.perf_counter()
    batch, reuse = _with_cached(cfg, k, step, prep.batch)
    upd = update(cfg.algo, cfg.optim, learner_temperature(cfg.sampling), k.model, k.opt, k.teacher, k.head_VH,
                 k.chunk, k.amp, batch)
    upd, off = _fresh_part(cfg, k, step, prep, upd)
    if not upd.skipped:
        k.teacher.update(k.model)  # ema: one step toward the new weights
    t["update"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    k.engine.sync(k.model)  # vllm: awake with the new weights, once per step (not in time_generate)
    t["sync"] = time.perf_counter() - t0
    row = _row(step + 1, prep.episodes, prep.rows, prep.batch, upd, t) | reuse | off
    return StepResult(row, prep.episodes, prep.rows, prep.contexts, prep.batch, upd)


def _with_cached(cfg: Config, k: _Parts, step: int, fresh: Batch) -> tuple[Batch, dict]:
    """The update's batch: the fresh one and the cached batches still fresh enough (``optim.reuse``),
    their old log-probs the current policy's; and the reuse metrics."""
    if k.cache is None or not k.cache.entries:
        return fresh, {}
    from agentopd.rl.learner import current_logprobs
    from agentopd.rl.offpolicy import concat

    temperature = learner_temperature(cfg.sampling)
    got = k.cache.draw(step, cfg.algo, lambda b: current_logprobs(cfg.optim, temperature, k.model, k.amp, b))
    return concat([fresh, *got.batches]), got.metrics


def _fresh_part(cfg: Config, k: _Parts, step: int, prep: Prepared, upd: Update) -> tuple[Update, dict]:
    """What the update computed for the fresh rows alone (it may have read cached ones too), the
    fresh batch cached for reuse, and the staleness metrics of asynchronous rollouts."""
    from agentopd.rl import offpolicy

    b = prep.batch
    B, T = b.mask_BT.shape
    old_BT = upd.old_BT[:B, :T]
    if upd.old_BT.shape != (B, T):
        upd = dataclasses.replace(upd, old_BT=old_BT, adv_BT=upd.adv_BT[:B, :T], rollout_BT=upd.rollout_BT[:B, :T],
                                  state_BT=upd.state_BT[:B, :T], rollout_metrics=rollout_correction(cfg.algo, b, old_BT)[1])
    behaviour_BT = torch.where(b.engine_mask_BT > 0, b.engine_BT, old_BT)
    if k.cache is not None and not upd.skipped:
        k.cache.add(step, b, behaviour_BT, upd.adv_BT)
    if not prep.age:
        return upd, {}
    return upd, {"rollout_age": prep.age,
                 "rollout_ess": offpolicy.ess(cfg.algo, cfg.optim.reuse.visitation, old_BT, behaviour_BT, b.mask_BT)}


def _step(cfg: Config, k: _Parts, step: int, starts: list) -> StepResult:
    """One training step on the problems ``starts``: rollouts, teacher contexts, scoring, the batch,
    the update, the teacher's own update and the engine's sync with the new weights."""
    return _learn(cfg, k, step, _prepare(cfg, k, step, starts))


def _service_failure(cfg: Config, prep: Prepared) -> str:
    """Why the step cannot be learned from: more than ``run.max_error_rate`` of its samples not
    judged, or of its teacher rows not scored, after the retries (agreed over the ranks); else empty."""
    episodes, batch, limit = prep.episodes, prep.batch, cfg.run.max_error_rate
    judged = [e.turns[-1].judgement for e in episodes]
    bad = [j for j in judged if j.verdict.status == "judge_error"]
    asked = batch.teacher_errors + int(batch.teacher_mask_B.sum())
    why = ""
    if judged and len(bad) > limit * len(judged):
        why = f"{len(bad)} of {len(judged)} samples could not be judged ({faults._judge_reason(bad[0])[:200]})"
    elif asked and batch.teacher_errors > limit * asked:
        why = f"{batch.teacher_errors} of {asked} teacher rows got no scores (the teacher at {cfg.teacher.base_url})"
    if distributed.world() > 1 and float(distributed.all_sum(torch.tensor(float(bool(why))))) and not why:
        why = "another rank's samples could not be judged or scored"
    n = cfg.run.service_retries
    return why and f"{why}: more than run.max_error_rate={limit:g} after {n} retr{'y' if n == 1 else 'ies'}"


def _resume(cfg: Config, ckpt_dir: str, model, opt, teacher, device) -> tuple[int, int, dict]:
    """``(step, data position, extra state)`` to start from: the newest readable checkpoint with
    ``run.resume`` (whose later metrics and sample rows are cut, as they are redone), else ``(0, 0, {})``."""
    from agentopd.rl import checkpoints

    if not cfg.run.resume:
        return 0, 0, {}
    start, data_pos, extra = checkpoints.resume(ckpt_dir, model, opt, teacher, device) or (0, 0, {})
    for name in ("metrics.jsonl", "samples.jsonl"):  # the rows after the checkpoint (or all) are redone
        checkpoints.cut_rows(os.path.join(cfg.run.out, name), start if start else -1)
    return start, data_pos, extra


def _setup(cfg: Config, engine, judge) -> _Parts:
    """Seeds, device, the envs (their problems and judge checked before the model loads), the model,
    its optimizer, teacher, reference and engine."""
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    device = pick_device(cfg.run.device)
    venvs, heldout = _envs(cfg, judge)  # a bad problems file fails before the model loads
    worker = None
    try:
        worker = _engine_process(cfg)  # its imports overlap the loading
        model, tok = load_model(cfg.model, cfg.run, device)
    except BaseException:
        _close(venvs, heldout)
        if worker is not None:
            worker.close()
        raise
    head_VH = lm_head_weight(model)
    chunk = cfg.optim.logits_chunk if head_VH is not None else 0  # hidden states, logits chunk by chunk
    teacher = load_teacher(cfg.teacher, model, device, cfg.run.seed, cfg.run.progress)
    if cfg.teacher.base_url:  # a served teacher's outage is retried (agentopd.faults)
        r = cfg.run
        teacher = faults.RetryingTeacher(teacher, r.max_error_rate, r.service_retries, r.retry_backoff_s)
    ref = Teacher(model, "frozen") if cfg.algo.ref_kl else None
    distributed.wrap(cfg, model, teacher, ref, device)  # torchrun: FSDP2 or DDP (the optimizer sees the shards)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                            weight_decay=cfg.optim.weight_decay)
    engine = distributed.engine((engine or _engine(cfg))(model, tok, device=device), model)
    lacks = [m for m in ("generate", "sleep", "wake", "sync") if not callable(getattr(engine, m, None))]
    if lacks:
        raise ConfigError(f"the engine {type(engine).__name__} lacks {', '.join(lacks)}: subclass "
                          "agentopd.inference.base.Engine (sleep, wake and sync do nothing there)")
    reuse = cfg.optim.reuse
    cache = ReplayCache(reuse.max_age, reuse.min_ess, reuse.visitation) if reuse.max_age else None
    return _Parts(model, tok, opt, teacher, ref, engine, venvs, heldout, autocast(precision(cfg.run.precision), device),
                  head_VH, chunk, cache, worker=worker)


def _engine_process(cfg: Config):
    """``run.async_steps``: the engine process, started now (one torch thread), else None."""
    if not cfg.run.async_steps:
        return None
    from agentopd.inference.worker import ProcessEngine

    return ProcessEngine(threads=1)


def _starts(cfg: Config, venv, data_pos: int) -> list:
    """The step's problems: positions in a fixed shuffle of the env's problems, or, for an env that does
    not list them, reset seeds (one per problem)."""
    P = cfg.sampling.prompts_per_step
    if not hasattr(venv, "problems"):
        return [cfg.run.seed * 1_000_003 + data_pos + i for i in range(P)]
    order = np.random.default_rng(cfg.run.seed).permutation(len(venv.problems)).tolist()
    return [order[(data_pos + i) % len(order)] for i in range(P)]


def _evaluate(cfg: Config, k: _Parts) -> dict:
    """Held-out pass@1 (and per turn), the same seed every time: differences come from the model."""
    from agentopd.envs.procedural import HELDOUT_SEED

    k.model.eval()
    if k.pipeline is not None:  # the rollouts ahead finish first: one judge at a time
        k.pipeline.drain()
    n = min(cfg.eval.problems, len(getattr(k.heldout, "problems", [None] * cfg.eval.problems)))
    with distributed.gathered(k.model), k.amp():  # rank 0 alone evaluates
        got = (heldout_eval(k.engine, k.tok, k.heldout, n, cfg.eval.samples, cfg.sampling, HELDOUT_SEED,
                            cfg.env.max_turns, cfg.env.feedback) if distributed.is_main() else None)
    return distributed.broadcast(got)


def _eval_due(ev: EvalConfig, step: int, last: bool) -> bool:
    """Whether the held-out evaluation runs after ``step`` (1-based)."""
    return last or step <= ev.dense_steps or bool(ev.every) and step % ev.every == 0


def train(cfg: Config, engine=None, judge=None) -> list[dict]:
    """Run ``cfg.run.steps`` steps; returns the metrics rows (also appended to metrics.jsonl).
    ``engine`` / ``judge``: use these instead of the ones the config names (an engine is built
    around the model by ``engine(model, tokenizer, device)`` when it is a callable class).
    A run that stops early (a stop signal, a failed write, a service down, non-finite updates, the
    collapse guard) raises :class:`agentopd.faults.Stopped`: one line and an exit status, after a
    checkpoint where there is one to write (:mod:`agentopd.faults`, :mod:`agentopd.rl.guard`); a
    second stop signal raises :class:`agentopd.faults.StopAtOnce` at once, nothing written or closed."""
    check(cfg)
    distributed.setup(cfg)  # torchrun: the process group; progress off on ranks > 0
    os.makedirs(cfg.run.out, exist_ok=True)
    with faults.GracefulStop(cfg.run.stop_grace_s, abandon=distributed.world() == 1) as stop:
        try:
            with stop.abandonable():  # nothing to lose yet
                run = _open(cfg, engine, judge)
        except faults.StepAbandoned:
            raise faults.Stopped(f"stopped by {stop.name} before the first step: nothing to save",
                                 faults.INTERRUPTED) from None
        at_once = False
        try:
            _loop(run, stop)
        except faults.StopAtOnce:
            at_once = True  # a second signal: nothing is closed or waited for
            raise
        finally:
            if not at_once:
                run.close()
    return run.rows


@dataclass
class _Run:
    """A run in progress: its parts, the steps done, the data position, its metrics rows and sinks,
    the guard, and the step of the newest checkpoint it wrote or resumed from."""

    cfg: Config
    k: _Parts
    step: int
    data_pos: int
    guard: Guard
    sinks: list
    saved: int
    rows: list = field(default_factory=list)

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.cfg.run.out, "checkpoints")

    def log(self, row: dict) -> None:
        from agentopd import jsonl

        self.rows.append(row)
        if distributed.is_main():
            jsonl.append(os.path.join(self.cfg.run.out, "metrics.jsonl"), [row])
            for sink, _ in self.sinks:
                sink(row)

    def save(self) -> str:
        """A checkpoint of the steps done (once per step), with the guard's state."""
        from agentopd.rl import checkpoints

        path = os.path.join(self.ckpt_dir, f"step-{self.step}")
        if self.saved != self.step:
            k = self.k
            checkpoints.save(self.ckpt_dir, self.step, k.model, k.tok, k.opt, k.teacher, self.data_pos,
                             self.cfg.run.save_merged, {"guard": self.guard.state_dict()}, self.offpolicy_state())
            self.saved = self.step
        return path

    def offpolicy_state(self) -> dict:
        """The rollout cache and the weights the next asynchronous rollouts sample with."""
        k = self.k
        return {**({"cache": k.cache.state_dict()} if k.cache is not None else {}),
                **({"versions": k.pipeline.state_dict(self.step)} if k.pipeline is not None else {})}

    def stop(self, code: int, why: str, holds: str = ""):
        """Stop here: a checkpoint of the steps done (none before the first), then Stopped(code)."""
        if self.step == 0:
            raise faults.Stopped(f"{why}; no step was completed: nothing to save", code, self.rows)
        path = self.save()
        raise faults.Stopped(f"{why}; checkpoint {path} holds {holds or f'step {self.step}'}; "
                             "run.resume=true continues from it", code, self.rows)

    def close(self) -> None:
        if self.k.pipeline is not None:
            self.k.pipeline.close()
        elif self.k.worker is not None:
            self.k.worker.close()
        for _, close in self.sinks:
            close()
        _close(self.k.venvs, self.k.heldout)
        distributed.teardown()


def _open(cfg: Config, engine, judge) -> _Run:
    """The parts, the metric sinks, and where the run starts (``run.resume``: the newest checkpoint)."""
    from agentopd.threads import configure_torch

    open_sinks = _metric_sinks(cfg) if distributed.is_main() else (lambda start: [])
    k = _setup(cfg, engine, judge)
    shared = getattr(getattr(k.venvs[0], "env", None), "judge", None)  # judging overlaps generation: its workers
    busy = (getattr(shared, "workers", 1) if cfg.sampling.generate_chunk else 0) + (1 if cfg.run.async_steps else 0)
    configure_torch(busy)  # agentopd.threads (run.async_steps: the engine process computes beside the learner)
    guard = Guard(cfg.run.guard_drop, cfg.run.guard_window, cfg.optim.max_bad_steps)
    ckpt_dir = os.path.join(cfg.run.out, "checkpoints")
    start, data_pos, extra = _resume(cfg, ckpt_dir, k.model, k.opt, k.teacher, next(k.model.parameters()).device)
    guard.load_state_dict(extra.get("guard", {}))
    if start:  # vllm: the resumed weights
        k.engine.sync(k.model)
    _offpolicy(cfg, k, start, data_pos, extra.get("offpolicy", {}))
    return _Run(cfg, k, start, data_pos, guard, open_sinks(start), start if start else -1)


def _offpolicy(cfg: Config, k: _Parts, start: int, data_pos: int, state: dict) -> None:
    """The resumed rollout cache, and the asynchronous rollouts (``run.async_steps``) from step ``start``
    on (data position ``data_pos``): an hf engine in its own process, the weights each step samples
    with as the checkpoint kept them."""
    from agentopd.async_rollouts import AsyncRollouts
    from agentopd.rl.learner import Batch

    if k.cache is not None and "cache" in state:
        k.cache.load_state_dict(state["cache"], Batch)
    if not cfg.run.async_steps:
        return
    P = cfg.sampling.prompts_per_step

    def rollout(engine, j: int):
        t = {"generate": 0.0, "execute": 0.0, "execute_total": 0.0}
        episodes = _rollouts(cfg, engine, k.tok, k.venvs, _starts(cfg, k.venvs[0], data_pos + (j - start) * P), j,
                             k.amp, t)
        return episodes, t

    engine = k.worker.attach(k.model, k.tok, cfg.engine.batch_size, **cfg.engine.kwargs)
    k.pipeline = AsyncRollouts(cfg.run.async_steps, engine, rollout, cfg.run.steps)
    k.pipeline.load_state_dict(state.get("versions", {}))


def _loop(run: _Run, stop: faults.GracefulStop) -> None:
    from tqdm import tqdm

    cfg, k = run.cfg, run.k
    if k.heldout is not None and run.step == 0:
        run.log({"step": 0, **_evaluate(cfg, k)})
    bar = tqdm(range(run.step, cfg.run.steps), initial=run.step, total=cfg.run.steps, desc="train",
               disable=not cfg.run.progress)
    for step in bar:
        _train_step(run, stop, step)
        bar.set_postfix(reward=f"{run.rows[-1]['reward_mean']:.3f}", kl=f"{run.rows[-1]['kl_teacher']:.3f}")
    if distributed.is_main():
        _summary(cfg, run.rows)


def _train_step(run: _Run, stop: faults.GracefulStop, step: int) -> None:
    """Step ``step + 1``. Its rollouts and scoring may be abandoned by a stop signal, and a step whose
    samples mostly failed is not learned from: both stop the run with a checkpoint of the step
    before, the RNGs as they were then (a resumed run redoes the step exactly)."""
    from agentopd.rl import checkpoints

    cfg, k = run.cfg, run.k
    rng = checkpoints.rng_state()
    t0 = time.perf_counter()
    try:
        with stop.abandonable():
            prep = _prepare(cfg, k, step, distributed.rank_share(_starts(cfg, k.venvs[0], run.data_pos)))
    except faults.StepAbandoned as e:
        checkpoints.set_rng_state(*rng)
        run.stop(faults.INTERRUPTED, f"stopped by {stop.name}: step {step + 1} abandoned ({e} would have passed)")
    failure = _service_failure(cfg, prep)
    if failure:
        checkpoints.set_rng_state(*rng)
        run.stop(faults.SERVICE_DOWN, f"step {step + 1} not learned from: {failure}")
    t1 = time.perf_counter()
    got = _learn(cfg, k, step, prep)
    got.row["time_step"] = time.perf_counter() - t0  # the step's wall time (its held-out evaluation apart)
    run.step, run.data_pos = step + 1, run.data_pos + cfg.sampling.prompts_per_step
    _finish(run, got)
    stop.record(t1 - t0, time.perf_counter() - t1)
    if _any_rank(stop.requested) and run.step < run.cfg.run.steps:  # (after the last step: done anyway)
        run.stop(faults.INTERRUPTED, f"stopped by {stop.name or 'a stop signal on another rank'} after step {run.step}")


def _finish(run: _Run, got: StepResult) -> None:
    """After the update: the held-out evaluation when due, the sample log, the metrics row, the
    guard's verdict (a line, a stop or a rollback), the checkpoint when due."""
    from agentopd import samples as sample_log
    from agentopd.rl import checkpoints

    cfg, k, step, row = run.cfg, run.k, run.step, got.row
    last = step == cfg.run.steps
    if k.heldout is not None and _eval_due(cfg.eval, step, last):
        t0 = time.perf_counter()
        row |= _evaluate(cfg, k)
        row["time_eval"] = time.perf_counter() - t0
    if distributed.is_main():
        sample_log.record(cfg.run, step, last, "heldout_pass1" in row, k.tok, got)
    act, line, best = _health(run, got.update, row)
    run.log(row)
    if act:
        _act(run, act, line)
    if best and cfg.run.guard == "rollback":  # a checkpoint to come back to
        run.save()
    if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0 or last:
        saved = run.save()
        if last:
            checkpoints.export_final(saved, os.path.join(cfg.run.out, "final"))


def _health(run: _Run, upd: Update, row: dict) -> tuple[str, str, bool]:
    """``(action, line, new best held-out)`` after a step: a skipped update (``skipped``, or
    ``unhealthy`` at ``optim.max_bad_steps`` in a row), else the collapse guard's findings
    (``run.guard``'s action); an action goes into the row as ``guard``."""
    if upd.skipped:
        line, stop = run.guard.skipped(run.step, upd.skipped)
        row["guard"] = "unhealthy" if stop else "skipped"
        return row["guard"], line, False
    run.guard.applied(run.step)
    if run.cfg.run.guard == "off":
        return "", "", False
    findings, best = run.guard.observe(row)
    if not findings:
        return "", "", best
    row["guard"] = run.cfg.run.guard
    return row["guard"], f"step {run.step}: collapse guard: {'; '.join(findings)}", best


def _act(run: _Run, act: str, line: str) -> None:
    """What the guard's verdict does: a line, a stop (checkpoint, UNHEALTHY) or a rollback."""
    if act in ("skipped", "warn"):
        if distributed.is_main():
            faults.say(line)
    elif act == "unhealthy":
        good = run.guard.last_good
        run.stop(faults.UNHEALTHY, line, f"the last good weights (those of step {good})" if good else
                 "the weights it started from (no update was applied)")
    elif act == "stop":
        run.stop(faults.UNHEALTHY, line)
    else:
        _rollback(run, line)


def _rollback(run: _Run, line: str) -> None:
    """Back to the newest checkpoint at or before the guard's target step, with the learning rate
    times ``run.guard_lr_factor``; the step count and the data go on."""
    from agentopd.rl import checkpoints

    k, target = run.k, run.guard.target()
    path = next((p for p in checkpoints.checkpoints(run.ckpt_dir) if int(p.rsplit("-", 1)[1]) <= target), None)
    if path is None:
        run.stop(faults.UNHEALTHY, f"{line}; no checkpoint at or before step {target} to roll back to")
    lrs = [group["lr"] * run.cfg.run.guard_lr_factor for group in k.opt.param_groups]  # lower than now, again
    checkpoints.load(path, k.model, k.opt, k.teacher, next(k.model.parameters()).device)
    for group, lr in zip(k.opt.param_groups, lrs):
        group["lr"] = lr
    run.guard.rolled_back()
    run.saved = -1  # the state is no longer the one saved at this step
    k.engine.sync(k.model)
    if distributed.is_main():
        faults.say(f"{line}; rolled back to {path}, learning rate now {k.opt.param_groups[0]['lr']:g}")


def _any_rank(flag: bool) -> bool:
    """``flag`` on any rank (every rank calls it)."""
    if distributed.world() == 1:
        return flag
    return float(distributed.all_sum(torch.tensor(float(flag)))) > 0


def _summary(cfg: Config, rows: list[dict]) -> None:
    """The held-out pass@1 before and after, on stderr (and per turn, multi-turn)."""
    from tqdm import tqdm

    evals = [r for r in rows if "heldout_pass1" in r]
    if not evals or "heldout_pass1" not in rows[-1]:
        return
    was = f"{evals[0]['heldout_pass1']:.3f} -> " if evals[0]["step"] == 0 and len(evals) > 1 else ""
    msg = f"held-out pass@1 ({cfg.eval.problems} problems x {cfg.eval.samples}): {was}{rows[-1]['heldout_pass1']:.3f}"
    if "heldout_pass_after_turn" in rows[-1]:
        per = lambda r: " ".join(f"{p:.3f}" for p in r["heldout_pass_after_turn"])  # noqa: E731
        msg += f"; after each turn: {per(evals[0]) + ' -> ' if was else ''}{per(rows[-1])}"
    tqdm.write(msg, file=sys.stderr)



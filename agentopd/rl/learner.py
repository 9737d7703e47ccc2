"""The learner step: score the sampled ids (student, teacher, reference), turn judgements into
advantages and a :class:`Batch`, and update the model by micro-batches over one algorithm-agnostic
per-token loss (:mod:`agentopd.rl.objectives`), returning what the update computed (:class:`Update`).
Each function takes the config sections it reads (``algo``, ``optim``), never the whole config."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from agentopd.config import AlgoConfig, OptimConfig, SamplingConfig
from agentopd.rl import distributed, losses, objectives, offpolicy
from agentopd.rl.logprobs import (
    can_share_prefix,
    causal_lm,
    gather_logprobs,
    hidden_logprobs,
    lm_head_weight,
    response_hidden,
    response_logits,
    sequence_logprobs,
    shared_prefix_hidden,
)


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


def learner_temperature(sampling: SamplingConfig) -> float:
    """What the learner divides its logits by: the sampling temperature (1 for greedy, whose engine
    log-probs are the untempered ones)."""
    return sampling.temperature if sampling.temperature > 0 else 1.0


def _divergence_BR(algo: AlgoConfig, teacher, student_BRX, head_VH, chunk: int, prompt_ids, response_ids,
                   mask_BR, amp, temperature: float) -> torch.Tensor:
    """KL_alpha(student, teacher) at each position of these rows, ``[B, R]``, both sides' logits divided
    by ``temperature``, over the full vocabulary or (``algo.distill_topk``) the student's top-K plus a
    tail bucket. ``chunk`` > 0: ``student_BRX`` is the student's final hidden states ``[B, R, H]``
    and both sides' logits are formed chunk by chunk (0 outside ``mask_BR``); 0: it is the student's
    logits ``[B, R, V]``."""
    with torch.no_grad(), amp():
        if chunk:
            teacher_BRH, teacher_head_VH = teacher.hidden(prompt_ids, response_ids)
        else:
            teacher_BRV = response_logits(teacher.model_for_scoring(), prompt_ids, response_ids)
    device = student_BRX.device
    if chunk:
        with amp():  # the head products in the autocast dtype, as in the forward passes
            if algo.distill_topk:
                return losses.kl_alpha_topk_chunked_per_token(
                    student_BRX, teacher_BRH.to(device), head_VH, mask_BR, algo.distill_alpha, algo.distill_topk,
                    chunk, teacher_head_VH.to(device), temperature)
            return losses.kl_alpha_chunked_per_token(student_BRX, teacher_BRH.to(device), head_VH, mask_BR,
                                                     algo.distill_alpha, chunk, teacher_head_VH.to(device), temperature)
    if algo.distill_topk:
        return losses.kl_alpha_topk_per_token(student_BRX, teacher_BRV.to(device), algo.distill_alpha,
                                              algo.distill_topk, temperature)
    return losses.kl_alpha_per_token(student_BRX, teacher_BRV.to(device), algo.distill_alpha, temperature)


def _served_divergence_BR(algo: AlgoConfig, topk: list, student_BRX, head_VH, chunk: int, mask_BR, amp,
                          temperature: float) -> torch.Tensor:
    """KL_alpha(student, teacher) over a served teacher's top-K tokens plus a tail bucket at each
    position of these rows, ``[B, R]`` (``topk``: each row's ``(ids_RK, logprobs_RK)``; the teacher's
    log-probs as the server gave them, the student's logits divided by ``temperature``)."""
    B, R = mask_BR.shape
    K = topk[0][0].shape[-1]
    ids_BRK = torch.zeros((B, R, K), dtype=torch.long)
    lp_BRK = torch.full((B, R, K), -1e4)
    for b, (ids_RK, lp_RK) in enumerate(topk):
        ids_BRK[b, :len(ids_RK)], lp_BRK[b, :len(lp_RK)] = ids_RK, lp_RK
    ids_BRK, lp_BRK = ids_BRK.to(student_BRX.device), lp_BRK.to(student_BRX.device)
    if chunk:
        with amp():
            return losses.kl_alpha_teacher_topk_chunked_per_token(student_BRX, head_VH, ids_BRK, lp_BRK, mask_BR,
                                                                  algo.distill_alpha, chunk, temperature)
    return losses.kl_alpha_teacher_topk_per_token(student_BRX, ids_BRK, lp_BRK, algo.distill_alpha, temperature)


def _engine_logprobs(gens: list, like_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's sampling log-probs ``[B, T]`` (shaped as ``like_BT``) and where it gave them: rows
    whose ``Generation.logprobs`` has one value per response id (an engine without log-probs: none)."""
    lp_BT, have_BT = torch.zeros_like(like_BT), torch.zeros_like(like_BT)
    for b, g in enumerate(gens):
        if g.response_ids and len(g.logprobs) == len(g.response_ids):
            lp_BT[b, :len(g.logprobs)] = torch.tensor(g.logprobs, dtype=lp_BT.dtype)
            have_BT[b, :len(g.logprobs)] = 1.0
    return lp_BT, have_BT


# ------------------------------------------------------------------------------------ scoring


@dataclass
class Scores:
    """3. What scoring gives the update: ``[B, T]`` log-probs of the same response ids under the
    student (None: the update's own forward gives them, :func:`old_from_update`), the teacher (on
    rows with a teacher prompt) and the reference (None: no reference KL); the response mask; a
    served teacher's top-K per row (None: a local teacher, scored in the update); and the rows whose
    teacher failed (a served teacher's per-sample errors: no signal, masked)."""

    ls_BT: torch.Tensor | None
    mask_BT: torch.Tensor
    lt_BT: torch.Tensor
    ref_BT: torch.Tensor | None
    teacher_topk: list | None = None
    teacher_failed: list[int] = field(default_factory=list)


def old_from_update(algo: AlgoConfig, optim: OptimConfig, model) -> bool:
    """Whether the old log-probs ``ls_old`` come from the update's own forward, detached, instead of
    a separate no-grad student forward before it. Exact: the first optimizer step comes after every
    micro-batch of the first epoch is forwarded, so until then the model is the one that sampled
    (as in TRL, which skips that forward on-policy). So unless ``optim.score_old``, where (1) the
    advantages read the student's log-probs at most row by row
    (:func:`agentopd.rl.advantages.student_logprobs_scope`; they are then formed per micro-batch) and
    (2) the model applies no dropout (the update forwards in train mode, scoring in eval mode).
    The scoring forward stays for the estimators that need the whole batch's student log-probs
    before the update: ``sd_token`` with ``center`` (a batch mean), ``sd_to_go`` (later turns and a
    group baseline), ``hybrid`` (group statistics) and any unknown one; and with ``optim.reuse`` (a
    batch's old log-probs and advantages are kept with it in the cache)."""
    from agentopd.rl import advantages

    scope = advantages.student_logprobs_scope(algo.advantage, algo.advantage_kwargs)
    return not optim.score_old and not optim.reuse.max_age and scope != "batch" and not _has_dropout(model)


def _has_dropout(model) -> bool:
    """Any dropout a train-mode forward would apply: a dropout module or a config rate above 0."""
    config = getattr(causal_lm(model), "config", None)
    rates = [v for k, v in (vars(config) if config is not None else {}).items()
             if "dropout" in k and isinstance(v, (int, float))]
    return any(r > 0 for r in rates) or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def is_served(teacher) -> bool:
    """Whether the teacher answers from a server (log-probs and its top-K, no model here)."""
    return teacher.mode == "served"


def _served_scores(teacher, teacher_prompts, resp_ids, scored: list[int], teacher_lp: list):
    """A served teacher's log-probs of rows ``scored`` into ``teacher_lp``: ``(top-K per row, failed rows)``."""
    topk, failed = [None] * len(resp_ids), []
    for b, got in zip(scored, teacher.score([teacher_prompts[b] for b in scored], [resp_ids[b] for b in scored])):
        if got is None or len(got.logprobs_R) != len(resp_ids[b]) or not torch.isfinite(got.logprobs_R).all():
            failed.append(b)
            continue
        teacher_lp[b] = got.logprobs_R.float().cpu()
        topk[b] = (got.topk_ids_RK.cpu(), got.topk_logprobs_RK.float().cpu())
    return topk, failed


def _logprobs(optim: OptimConfig, temperature: float, scorer, prompts: list, responses: list) -> list:
    """Each response's log-probs under ``scorer`` (repeated prompts forwarded once, as in the update)."""
    with distributed.gathered(scorer):  # FSDP: any number of forwards per rank
        return sequence_logprobs(scorer, prompts, responses, micro_batch=optim.micro_batch, chunk=optim.logits_chunk,
                                 temperature=temperature, share_prefix=optim.share_prompts)[0]


def current_logprobs(optim: OptimConfig, temperature: float, model, amp, batch: Batch) -> torch.Tensor:
    """The model's log-probs of a batch's response ids now, ``[B, T]`` as its mask, no grad (a cached
    batch's log-probs under the current policy: its old log-probs for this update)."""
    model.eval()
    with torch.no_grad(), amp():
        got = _logprobs(optim, temperature, model, batch.prompt_ids, batch.response_ids)
    return pad_BT([lp.float().cpu() for lp in got])[0]  # (the mask is padded the same way)


def score(algo: AlgoConfig, optim: OptimConfig, temperature: float, model, teacher, ref, amp, rows: TurnRows,
          teacher_prompts) -> Scores:
    """3. The student's, teacher's (on rows with a teacher prompt) and reference's log-probs of the
    same response ids at ``temperature``, no grad (:class:`Scores`)."""
    resp_ids = [g.response_ids for g in rows.turns]
    student_prompts = rows.prompt_ids
    score = functools.partial(_logprobs, optim, temperature)  # (scorer, prompts, responses)
    topk, failed = None, []
    with torch.no_grad(), amp():
        student_lp = None if old_from_update(algo, optim, model) else score(model, student_prompts, resp_ids)
        scored = [b for b, tp in enumerate(teacher_prompts) if tp is not None]
        teacher_lp = [torch.zeros(len(r)) for r in resp_ids]
        if scored and is_served(teacher):
            topk, failed = _served_scores(teacher, teacher_prompts, resp_ids, scored, teacher_lp)
        elif scored:
            got = score(teacher.model_for_scoring(), [teacher_prompts[b] for b in scored], [resp_ids[b] for b in scored])
            for b, lp in zip(scored, got):
                teacher_lp[b] = lp.float().cpu()
        ref_lp = score(ref.model_for_scoring(), student_prompts, resp_ids) if ref else None
    mask_BT = pad_BT([[0.0] * len(r) for r in resp_ids])[1]
    ls_BT = pad_BT([lp.float().cpu() for lp in student_lp])[0] if student_lp is not None else None
    ref_BT = pad_BT([r.float().cpu() for r in ref_lp])[0] if ref else None
    return Scores(ls_BT, mask_BT, pad_BT(teacher_lp)[0], ref_BT, topk, failed)


# ---------------------------------------------------------------------------------- the batch


@dataclass(frozen=True)
class Batch:
    """4. What the update reads, nothing of it changed by the update: per row ``b`` its prompt ids,
    response ids and teacher prompt (None: no teacher signal); ``[B, T]`` tensors; the whole batch's
    token counts (all ranks'). ``old_BT`` None: the old log-probs come from the update's first
    forward (:func:`old_from_update`); ``adv_BT`` None: row-local advantages formed from them
    (``adv_inputs``)."""

    prompt_ids: list
    response_ids: list
    teacher_prompts: list
    mask_BT: torch.Tensor  # the loss mask: the response tokens of rows with a judged reward
    teacher_mask_B: torch.Tensor
    teacher_BT: torch.Tensor
    ref_BT: torch.Tensor | None
    engine_BT: torch.Tensor  # the engine's sampling log-probs, on engine_mask_BT
    engine_mask_BT: torch.Tensor
    n_tok: torch.Tensor
    n_teacher_tok: torch.Tensor
    old_BT: torch.Tensor | None
    adv_BT: torch.Tensor | None
    adv_inputs: object = None
    teacher_topk: list | None = None  # a served teacher's (ids_RK, logprobs_RK) per row (None: a local teacher)
    teacher_errors: int = 0
    stale_B: torch.Tensor | None = None  # 1: the row was sampled by older weights (cached, async); None: none was


def make_batch(algo: AlgoConfig, rows: TurnRows, teacher_prompts, scores: Scores) -> Batch:
    """4. Advantages (judge errors and empty responses carry no gradient; reward-based estimators
    see each episode once, with its episode reward) packed with the scores for the update. Without
    the student's scores (``scores.ls_BT`` None) the old log-probs and the row-local advantages are
    left to the update's first forward."""
    from agentopd.rl import advantages

    mask_BT = scores.mask_BT
    failed = set(scores.teacher_failed)  # a served teacher's errors: no signal
    teacher_prompts = [None if b in failed else tp for b, tp in enumerate(teacher_prompts)]
    pending = scores.ls_BT is None
    ls_BT = torch.zeros_like(mask_BT) if pending else scores.ls_BT
    rewards_B = torch.tensor(rows.rewards, dtype=torch.float32)
    rewards_B = torch.where(torch.isfinite(rewards_B), rewards_B, torch.nan)  # an infinite reward: no reward
    teacher_mask_B = torch.tensor([tp is not None for tp in teacher_prompts], dtype=torch.float32)
    inputs = advantages.AdvantageInputs(rewards_B, torch.tensor(rows.groups), mask_BT, ls_BT, scores.lt_BT,
                                        teacher_mask_B, torch.tensor(rows.success), torch.tensor(rows.episodes),
                                        torch.tensor(rows.turn_index))
    mask_BT = mask_BT * (~torch.isnan(rewards_B))[:, None]
    row_adv = pending and advantages.student_logprobs_scope(algo.advantage, algo.advantage_kwargs) == "row"
    engine_BT, engine_mask_BT = _engine_logprobs(rows.turns, mask_BT)
    return Batch(rows.prompt_ids, [g.response_ids for g in rows.turns], teacher_prompts, mask_BT, teacher_mask_B,
                 scores.lt_BT, scores.ref_BT, engine_BT, engine_mask_BT * mask_BT,
                 n_tok=distributed.all_sum(mask_BT.sum()).clamp(min=1),
                 n_teacher_tok=distributed.all_sum((mask_BT * teacher_mask_B[:, None]).sum()).clamp(min=1),
                 old_BT=None if pending else ls_BT, adv_BT=None if row_adv else _advantages(algo, inputs, mask_BT),
                 adv_inputs=inputs if row_adv else None, teacher_topk=scores.teacher_topk,
                 teacher_errors=len(failed))


def _advantages(algo: AlgoConfig, inputs, mask_BT: torch.Tensor) -> torch.Tensor:
    """``algo.advantage`` on ``inputs``, 0 outside ``mask_BT`` (the loss mask: judge errors out)."""
    from agentopd.rl import advantages

    return torch.nan_to_num(advantages.compute(algo.advantage, inputs, **algo.advantage_kwargs)) * mask_BT


# ---------------------------------------------------------------------------------- the update


@dataclass
class Update:
    """5. What the update computed: the summed loss, the metric sums over micro-batches, the last
    gradient norm, the old log-probs ``[B, T]`` (from scoring or the first forward), the advantages
    it used, the rollout correction and its metrics (``rollout_logprob_diff``, ...). ``skipped``:
    the term that was not finite (``teacher_logprobs``, ``ref_logprobs``, a loss term, ``loss``,
    ``grad_norm``) when an optimizer step was skipped for it, else empty."""

    loss: float
    metrics: dict
    grad_norm: float
    old_BT: torch.Tensor
    adv_BT: torch.Tensor
    rollout_BT: torch.Tensor
    rollout_metrics: dict
    skipped: str = ""
    state_BT: torch.Tensor | None = None  # the weight of the objective's state terms (agentopd.rl.offpolicy)


@dataclass
class _Pass:
    """One update's fixed parts, shared by its micro-batches, and what its first forward fills in:
    the old log-probs, the row-local advantages and the rollout correction (``pending`` until then)."""

    algo: AlgoConfig
    optim: OptimConfig
    temperature: float
    model: object
    teacher: object
    head_VH: object
    chunk: int
    amp: object
    batch: Batch
    old_BT: torch.Tensor
    adv_BT: torch.Tensor
    rollout_BT: torch.Tensor
    state_BT: torch.Tensor  # the weight of the objective's state terms (agentopd.rl.offpolicy)
    pending: bool


def update(algo: AlgoConfig, optim: OptimConfig, temperature: float, model, opt, teacher, head_VH, chunk: int, amp,
           batch: Batch) -> Update:
    """5. Micro-batches with gradient accumulation, ``optim.epochs_per_batch`` optimizer steps (the
    importance ratio corrects the later ones). The teacher's own update (its EMA step) is the caller's.
    A step whose numbers are not finite (the teacher's or reference's log-probs where the loss reads
    them, a loss term, the gradient norm) is skipped, the optimizer and its state untouched, and so
    are the epochs after it (``Update.skipped`` names the term; every rank agrees)."""
    model.train()
    pending = batch.old_BT is None
    old_BT = torch.zeros_like(batch.mask_BT) if pending else batch.old_BT
    rollout_BT = torch.ones_like(batch.mask_BT) if pending else rollout_correction(algo, batch, old_BT)[0]
    p = _Pass(algo, optim, temperature, model, teacher, head_VH, chunk, amp, batch, old_BT.clone(),
              torch.zeros_like(batch.mask_BT) if batch.adv_BT is None else batch.adv_BT.clone(), rollout_BT,
              rollout_BT.clone() if pending else _state(algo, optim, batch, old_BT, rollout_BT), pending)
    skipped = _agree(_nonfinite_inputs(batch))
    if skipped:
        return Update(math.nan, {}, math.nan, p.old_BT, p.adv_BT, p.rollout_BT, {}, skipped, p.state_BT)
    B, W = len(batch.response_ids), distributed.world()
    sums = {"loss": 0.0, "distill_loss": 0.0, "clipfrac": 0.0}
    starts = range(0, B, optim.micro_batch)
    divergence_teacher = (teacher.model_for_scoring() if "divergence" in objectives.needs(algo)
                          and not is_served(teacher) else None)
    with distributed.gathered(divergence_teacher):  # FSDP: the teacher's forwards need no collective
        for _ in range(optim.epochs_per_batch):
            opt.zero_grad(set_to_none=True)
            epoch = {"loss": 0.0}
            for s in starts:
                loss, met = _accumulate(p, list(range(s, min(s + optim.micro_batch, B))), s == starts[-1], W)
                for k, v in {"loss": loss, **met}.items():
                    epoch[k] = epoch.get(k, 0.0) + v
            p.pending = False
            gnorm = float(distributed.full(torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)))
            for k, v in epoch.items():
                sums[k] = sums.get(k, 0.0) + v
            skipped = _agree(_nonfinite_step(epoch, gnorm))
            if skipped:
                opt.zero_grad(set_to_none=True)
                break
            opt.step()
    sums = distributed.sum_dicts(sums)
    rollout_metrics = rollout_correction(algo, batch, p.old_BT)[1]
    return Update(sums.pop("loss"), sums, gnorm, p.old_BT, p.adv_BT, p.rollout_BT, rollout_metrics, skipped, p.state_BT)


def _nonfinite_inputs(batch: Batch) -> str:
    """The first input of the loss that is not finite where the loss reads it: ``teacher_logprobs``
    (on teacher-signal tokens) or ``ref_logprobs``; empty when all are."""
    m_BT = batch.mask_BT > 0
    if not torch.isfinite(batch.teacher_BT[m_BT & (batch.teacher_mask_B[:, None] > 0)]).all():
        return "teacher_logprobs"
    if batch.ref_BT is not None and not torch.isfinite(batch.ref_BT[m_BT]).all():
        return "ref_logprobs"
    return ""


def _nonfinite_step(epoch: dict, grad_norm: float) -> str:
    """The first of an optimizer step's numbers that is not finite: a loss term (``pg_loss``,
    ``distill_loss``, ...: this rank's sums), ``loss``, then ``grad_norm``; empty when all are."""
    terms = [k for k in epoch if k.endswith("_loss")] + ["loss"]
    bad = [k for k in terms if not math.isfinite(epoch[k])]
    return bad[0] if bad else ("" if math.isfinite(grad_norm) else "grad_norm")


def _agree(term: str) -> str:
    """``term``, agreed over the ranks: a step one rank finds bad is skipped on every rank."""
    if distributed.world() == 1:
        return term
    if float(distributed.all_sum(torch.tensor(float(bool(term))))) == 0:
        return ""
    return term or "another rank's numbers"


def _accumulate(p: _Pass, idx: list[int], last: bool, W: int) -> tuple[float, dict]:
    """One micro-batch's forward and backward (gradients accumulate): its loss and metrics."""
    idx, rest = _weighted_rows(p, idx)
    if rest and p.pending and p.batch.mask_BT[rest].sum() > 0:  # their old log-probs, for the metrics
        with torch.no_grad():
            _forward(p, rest)
    empty = not idx or p.batch.mask_BT[idx].sum() == 0
    if empty and W == 1:
        return 0.0, {}
    with distributed.grad_sync(p.model, last):
        loss, met = (_idle_loss(p.model, p.amp), {}) if empty else _micro_batch_loss(p, idx)
        if loss.requires_grad:  # e.g. sdpo on a micro-batch with no teacher signal: nothing to learn
            (loss * W).backward()  # the ranks' gradients are averaged: their sum is the batch's
    return float(loss.detach()), met


def rollout_correction(algo: AlgoConfig, batch: Batch, old_BT: torch.Tensor, idx=slice(None)):
    """The rollout correction of rows ``idx`` from their old log-probs, and its metrics."""
    return objectives.rollout_weights(old_BT[idx], batch.engine_BT[idx], batch.engine_mask_BT[idx], algo.rollout_is_clip)


def _state(algo: AlgoConfig, optim: OptimConfig, batch: Batch, old_BT: torch.Tensor, rollout_BT: torch.Tensor,
           idx=slice(None)) -> torch.Tensor:
    """The weight of the objective's state terms on rows ``idx`` (``rollout_BT``: their rollout
    correction): that correction on rows sampled by the current weights; on stale rows the
    visitation correction, or 1 with ``optim.reuse.visitation`` off (:mod:`agentopd.rl.offpolicy`)."""
    if batch.stale_B is None or not (batch.stale_B[idx] > 0).any():
        return rollout_BT
    visit_BT = (offpolicy.visitation_weights(old_BT[idx], batch.engine_BT[idx], batch.engine_mask_BT[idx],
                                             algo.rollout_is_clip)
                if optim.reuse.visitation else torch.ones_like(rollout_BT))
    return torch.where(batch.stale_B[idx][:, None] > 0, visit_BT, rollout_BT)


def _forward(p: _Pass, idx: list[int]):
    """The student's forward over rows ``idx``: its final hidden states ``[B, R, H]`` (chunk > 0) or
    logits ``[B, R, V]``, the head, and the log-probs ``[B, T]``; in the first epoch also their old
    log-probs and what is formed from them (row-local advantages, the rollout correction)."""
    b = p.batch
    P_, R_ = [b.prompt_ids[i] for i in idx], [b.response_ids[i] for i in idx]
    shared = p.optim.share_prompts and can_share_prefix(p.model, P_)
    fwd = (shared_prefix_hidden if shared else response_hidden) if p.chunk else response_logits
    with p.amp():  # the head in autocast too
        out_BRX = fwd(p.model, P_, R_)  # a group's rows share their prompt: forwarded once
        head_VH = lm_head_weight(p.model) if p.chunk else p.head_VH  # FSDP: the head this forward gathered
        lp_BT = _stack(hidden_logprobs(out_BRX, head_VH, R_, p.chunk, temperature=p.temperature)[0] if p.chunk else
                       gather_logprobs(out_BRX, R_, p.temperature), b.mask_BT.shape[1])
    if p.pending:
        old_BT = lp_BT.detach().float().cpu()
        p.old_BT[idx] = old_BT
        if b.adv_inputs is not None:
            p.adv_BT[idx] = _advantages(p.algo, b.adv_inputs.rows(idx, student_logprobs_BT=old_BT), b.mask_BT[idx])
        p.rollout_BT[idx] = rollout_correction(p.algo, b, p.old_BT, idx)[0]
        p.state_BT[idx] = _state(p.algo, p.optim, b, p.old_BT, p.rollout_BT[idx], idx)
    return out_BRX, head_VH, lp_BT


def _weighted_rows(p: _Pass, idx: list[int]) -> tuple[list[int], list[int]]:
    """Rows ``idx`` as (those the loss weighs, the others): under a loss whose every term lives on the
    teacher-signal tokens (:data:`agentopd.rl.objectives.TEACHER_ROWS_ONLY`) and no reference KL, rows
    without a teacher signal have no gradient, so no backward; one rank only (FSDP: every rank runs
    the same forwards)."""
    if not (p.algo.loss in objectives.TEACHER_ROWS_ONLY and p.batch.ref_BT is None and distributed.world() == 1):
        return idx, []
    return [i for i in idx if p.batch.teacher_mask_B[i] > 0], [i for i in idx if p.batch.teacher_mask_B[i] == 0]


def _micro_batch_loss(p: _Pass, idx: list[int]):
    """Rows ``idx``'s share of the whole batch's loss (``algo.loss``, plus the reference KL) and metrics."""
    b, algo = p.batch, p.algo
    R_ = [b.response_ids[i] for i in idx]
    out_BRX, head_VH, lp_BT = _forward(p, idx)
    dev = lp_BT.device
    m_BT = b.mask_BT[idx].to(dev)
    tm_BT = m_BT * b.teacher_mask_B[idx, None].to(dev)
    tb = objectives.TokenBatch(lp_BT, p.old_BT[idx].to(dev), p.adv_BT[idx].to(dev), m_BT / b.n_tok,
                               tm_BT / b.n_teacher_tok, p.rollout_BT[idx].to(dev), p.state_BT[idx].to(dev),
                               b.teacher_BT[idx].to(dev))
    rows = [k for k, i in enumerate(idx) if b.teacher_prompts[i] is not None and len(R_[k])]
    if "divergence" in objectives.needs(algo):
        tb.divergence_BT = torch.zeros_like(lp_BT)
        if rows:
            Rm = max(len(R_[k]) for k in rows)
            if b.teacher_topk is not None:
                tb.divergence_BT[rows, :Rm] = _served_divergence_BR(
                    algo, [b.teacher_topk[idx[k]] for k in rows], out_BRX[rows, :Rm], head_VH, p.chunk,
                    tm_BT[rows, :Rm], p.amp, p.temperature)
            else:
                tb.divergence_BT[rows, :Rm] = _divergence_BR(
                    algo, p.teacher, out_BRX[rows, :Rm], head_VH, p.chunk, [b.teacher_prompts[idx[k]] for k in rows],
                    [R_[k] for k in rows], tm_BT[rows, :Rm], p.amp, p.temperature)
    loss, metrics = objectives.loss(algo, tb)
    if not loss.requires_grad and distributed.world() > 1:  # every rank's backward takes part in the reduction
        loss = loss + 0.0 * lp_BT.nan_to_num().sum()
    if b.ref_BT is not None:
        loss = loss + algo.ref_kl * (m_BT.sum() / b.n_tok) * losses.ref_kl_k3(lp_BT, b.ref_BT[idx].to(dev), m_BT)
    return loss, metrics


def _idle_loss(model, amp) -> torch.Tensor:
    """Zero, through one forward of the model: a rank's micro-batch without tokens still takes part
    in the gradient reduction."""
    with amp():
        return 0.0 * response_logits(model, [[0]], [[0]]).float().sum()


@dataclass
class TurnRows:
    """A step's episodes as learner rows, one per turn (its prompt ids hold the conversation so far,
    so the loss mask, the response, covers only sampled ids): per row its episode, turn number,
    group, the episode's reward (NaN: a judge error) and the turn's own success."""

    turns: list
    prompt_ids: list
    episodes: list[int]
    turn_index: list[int]
    groups: list[int]
    rewards: list[float]
    success: list[bool]

    @classmethod
    def of(cls, episodes: list, discount: float = 1.0) -> TurnRows:
        rows = [(e, k, ep, t) for e, ep in enumerate(episodes) for k, t in enumerate(ep.turns)]
        return cls([t for *_, t in rows], [t.prompt_ids for *_, t in rows], [e for e, *_ in rows],
                   [k for _, k, *_ in rows], [ep.group for _, _, ep, _ in rows],
                   [ep.reward(discount) for _, _, ep, _ in rows],
                   [t.judgement.verdict.status == "ok" for *_, t in rows])



def _stack(lp_list, T: int) -> torch.Tensor:
    """Right-pad per-sequence log-prob tensors (keeping their grad) to [B, T]."""
    return torch.stack([torch.nn.functional.pad(x.float(), (0, T - x.shape[0])) for x in lp_list])

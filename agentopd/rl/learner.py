"""The learner step: score the sampled ids (student, self-teacher, reference), turn judgements into
advantages and the rollout correction, and update the model by micro-batches over one
algorithm-agnostic per-token loss (:mod:`agentopd.rl.objectives`). Also the model's loading, device
and autocast, shared by training and the teacher diagnostic."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
import torch

from agentopd.config import AlgoConfig, Config, SamplingConfig
from agentopd.rl import distributed, losses, objectives
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


def load_model(cfg: Config, device):
    from agentopd.inference import load_pretrained

    # float32 master weights whatever the stored dtype (bf16 autocast does the compute): AdamW's and the
    # EMA teacher's small updates would be lost below bf16's spacing; the teacher and reference copy these
    model, tok = load_pretrained(cfg.model.path, seed=cfg.run.seed, progress=cfg.run.progress, dtype=torch.float32)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.model.lora_rank:
        from peft import LoraConfig, get_peft_model

        from agentopd.rl.checkpoints import lora_base

        base = lora_base(cfg.model.path, model, tok, os.path.join(cfg.run.out, "base"))
        model = get_peft_model(model, LoraConfig(r=cfg.model.lora_rank, lora_alpha=2 * cfg.model.lora_rank,
                                                 target_modules="all-linear"))
        model.peft_config["default"].base_model_name_or_path = base  # what the saved adapter names
    return model.to(device), tok


def load_teacher(cfg: Config, model, device: torch.device):
    """The teacher ``cfg.teacher`` names: the self-teacher (:class:`agentopd.rl.teacher.Teacher`, in
    ``teacher.mode``), a separate frozen model (:class:`agentopd.rl.teacher.ModelTeacher`, on
    ``teacher.device`` in ``teacher.dtype``) or a served one (:class:`agentopd.rl.served.ServedTeacher`)."""
    from agentopd.rl.teacher import ModelTeacher, Teacher

    t = cfg.teacher
    if t.base_url:
        from agentopd.rl.served import ServedTeacher

        return ServedTeacher(t.base_url, t.served_model, topk=t.served_topk, timeout=t.timeout)
    if not t.model:
        return Teacher(model, t.mode, tau=t.tau, mix=t.mix)
    from agentopd.inference import load_pretrained

    where = device if t.device == "auto" else torch.device(t.device)
    dtype = {"auto": torch.bfloat16 if where.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[t.dtype]
    teacher_model, _ = load_pretrained(t.model, seed=cfg.run.seed, progress=cfg.run.progress, dtype=dtype)
    return ModelTeacher(teacher_model.to(where))


def pick_device(cfg: Config) -> torch.device:
    """``run.device``; 'auto': CUDA when available, else the CPU."""
    if cfg.run.device != "auto":
        return torch.device(cfg.run.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision(cfg: Config) -> str:
    precision = "off" if cfg.run.precision is False else cfg.run.precision
    if precision not in ("auto", "bf16", "off"):  # True, which the config's type lets through
        from agentopd.config import ConfigError

        raise ConfigError(f"run.precision: {cfg.run.precision!r}; choices: auto, bf16, off")
    return precision


def autocast(precision: str, device: torch.device):
    """A factory of the forward passes' context: bf16 autocast under 'bf16', and under 'auto' on CUDA."""
    on = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def learner_temperature(sampling: SamplingConfig) -> float:
    """What the learner divides its logits by: the sampling temperature (1 for greedy, whose engine
    log-probs are the untempered ones)."""
    return sampling.temperature if sampling.temperature > 0 else 1.0


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


def _divergence_BR(algo: AlgoConfig, teacher, student_BRX, head_VH, chunk: int, prompt_ids, response_ids,
                   mask_BR, amp, temperature: float) -> torch.Tensor:
    """KL_alpha(student, teacher) at each position of these rows, ``[B, R]``, both sides' logits divided
    by ``temperature``, over the full vocabulary or (``algo.distill_topk``) the student's top-K plus a
    tail bucket. ``chunk`` > 0: ``student_BRX`` is the student's final hidden states ``[B, R, H]``
    and both sides' logits are formed chunk by chunk (0 outside ``mask_BR``); 0: it is the student's
    logits ``[B, R, V]``."""
    with torch.no_grad(), amp():
        if chunk:
            teacher_BRH, teacher_head_VH = _teacher_hidden(teacher, prompt_ids, response_ids)
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


@dataclass
class StepBatch:
    """What the update of one step reads: per sample ``b``, its prompt ids, response ids and teacher
    prompt (None: no teacher signal); ``[B, T]`` tensors; the whole batch's token counts."""

    prompt_ids: list
    response_ids: list
    teacher_prompts: list
    old_BT: torch.Tensor
    teacher_BT: torch.Tensor
    adv_BT: torch.Tensor
    mask_BT: torch.Tensor
    teacher_mask_B: torch.Tensor
    rollout_BT: torch.Tensor
    ref_BT: torch.Tensor | None
    n_tok: torch.Tensor
    n_teacher_tok: torch.Tensor
    engine_BT: torch.Tensor | None = None  # the engine's log-probs, on its tokens within the mask (engine_mask_BT)
    engine_mask_BT: torch.Tensor | None = None
    pending_old: bool = False  # old_BT (and what comes from it) still to be filled by the first epoch's forwards
    adv_inputs: object = None  # pending: the AdvantageInputs of row-local advantages formed per micro-batch (None: adv_BT is final)
    rollout_metrics: dict | None = None  # the rollout correction's metrics (pending: filled after the first epoch)
    teacher_topk: list | None = None  # a served teacher's (ids_RK, logprobs_RK) per row (None: a local teacher)


def _micro_batch_loss(cfg: Config, model, teacher, head_VH, chunk: int, amp, st: StepBatch, idx: list[int]):
    """Samples ``idx``'s share of the whole batch's loss (``algo.loss``, plus the reference KL) and metrics."""
    T = learner_temperature(cfg.sampling)
    R_ = [st.response_ids[b] for b in idx]
    out_BRX, head_VH, lp_BT = _forward(cfg, model, head_VH, chunk, amp, st, idx)
    dev = lp_BT.device
    m_BT = st.mask_BT[idx].to(dev)
    tm_BT = m_BT * st.teacher_mask_B[idx, None].to(dev)
    batch = objectives.TokenBatch(lp_BT, st.old_BT[idx].to(dev), st.adv_BT[idx].to(dev), m_BT / st.n_tok,
                                  tm_BT / st.n_teacher_tok, st.rollout_BT[idx].to(dev), st.teacher_BT[idx].to(dev))
    rows = [k for k, b in enumerate(idx) if st.teacher_prompts[b] is not None and len(R_[k])]
    if "divergence" in objectives.needs(cfg.algo):
        batch.divergence_BT = torch.zeros_like(lp_BT)
        if rows:
            Rm = max(len(R_[k]) for k in rows)
            if st.teacher_topk is not None:
                batch.divergence_BT[rows, :Rm] = _served_divergence_BR(
                    cfg.algo, [st.teacher_topk[idx[k]] for k in rows], out_BRX[rows, :Rm], head_VH, chunk,
                    tm_BT[rows, :Rm], amp, T)
            else:
                batch.divergence_BT[rows, :Rm] = _divergence_BR(
                    cfg.algo, teacher, out_BRX[rows, :Rm], head_VH, chunk, [st.teacher_prompts[idx[k]] for k in rows],
                    [R_[k] for k in rows], tm_BT[rows, :Rm], amp, T)
    loss, metrics = objectives.loss(cfg.algo, batch)
    if not loss.requires_grad and distributed.world() > 1:  # every rank's backward takes part in the reduction
        loss = loss + 0.0 * lp_BT.nan_to_num().sum()
    if st.ref_BT is not None:
        loss = loss + cfg.algo.ref_kl * (m_BT.sum() / st.n_tok) * losses.ref_kl_k3(lp_BT, st.ref_BT[idx].to(dev), m_BT)
    return loss, metrics


def old_from_update(cfg: Config, model) -> bool:
    """Whether the old log-probs ``ls_old`` come from the update's own forward, detached, instead of
    a separate no-grad student forward before it. Exact: the first optimizer step comes after every
    micro-batch of the first epoch is forwarded, so until then the model is the one that sampled
    (as in TRL, which skips that forward on-policy). So unless ``optim.score_old``, where (1) the
    advantages read the student's log-probs at most row by row
    (:func:`agentopd.rl.advantages.student_logprobs_scope`; they are then formed per micro-batch) and
    (2) the model applies no dropout (the update forwards in train mode, scoring in eval mode).
    The scoring forward stays for the estimators that need the whole batch's student log-probs
    before the update: ``sd_token`` with ``center`` (a batch mean), ``sd_to_go`` (later turns and a
    group baseline), ``hybrid`` (group statistics) and any unknown one."""
    from agentopd.rl import advantages

    scope = advantages.student_logprobs_scope(cfg.algo.advantage, cfg.algo.advantage_kwargs)
    return not cfg.optim.score_old and scope != "batch" and not _has_dropout(model)


def _has_dropout(model) -> bool:
    """Any dropout a train-mode forward would apply: a dropout module or a config rate above 0."""
    config = getattr(causal_lm(model), "config", None)
    rates = [v for k, v in (vars(config) if config is not None else {}).items()
             if "dropout" in k and isinstance(v, (int, float))]
    return any(r > 0 for r in rates) or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def _old_from_forward(cfg: Config, st: StepBatch, idx: list[int], lp_BT: torch.Tensor) -> None:
    """Rows ``idx``'s old log-probs from this first-epoch forward (detached) and what is formed from
    them: their row-local advantages and their rollout correction."""
    old_BT = lp_BT.detach().float().cpu()
    st.old_BT[idx] = old_BT
    if st.adv_inputs is not None:
        st.adv_BT[idx] = _advantages(cfg, st.adv_inputs.rows(idx, student_logprobs_BT=old_BT), st.mask_BT[idx])
    st.rollout_BT[idx] = objectives.rollout_weights(old_BT, st.engine_BT[idx], st.engine_mask_BT[idx],
                                                    cfg.algo.rollout_is_clip)[0]


def _settle_old(cfg: Config, st: StepBatch) -> None:
    """After the first epoch's forwards: the rollout metrics over the whole batch, from the old log-probs."""
    if st.pending_old:
        st.pending_old = False
        st.rollout_metrics.update(objectives.rollout_weights(st.old_BT, st.engine_BT, st.engine_mask_BT,
                                                             cfg.algo.rollout_is_clip)[1])


def _forward(cfg: Config, model, head_VH, chunk: int, amp, st: StepBatch, idx: list[int]):
    """The student's forward over rows ``idx``: its final hidden states ``[B, R, H]`` (chunk > 0) or
    logits ``[B, R, V]``, the head, and the log-probs ``[B, T]``; in the first epoch also their old
    log-probs (:func:`_old_from_forward`)."""
    P_, R_ = [st.prompt_ids[b] for b in idx], [st.response_ids[b] for b in idx]
    shared = cfg.optim.share_prompts and can_share_prefix(model, P_)
    fwd = (shared_prefix_hidden if shared else response_hidden) if chunk else response_logits
    with amp():  # the head in autocast too
        out_BRX = fwd(model, P_, R_)  # a group's rows share their prompt: forwarded once
        head_VH = lm_head_weight(model) if chunk else head_VH  # FSDP: the head this forward gathered
        T = learner_temperature(cfg.sampling)
        lp_BT = _stack(hidden_logprobs(out_BRX, head_VH, R_, chunk, temperature=T)[0] if chunk else
                       gather_logprobs(out_BRX, R_, T), st.old_BT.shape[1])
    if st.pending_old:
        _old_from_forward(cfg, st, idx, lp_BT)
    return out_BRX, head_VH, lp_BT


def _weighted_rows(cfg: Config, st: StepBatch, idx: list[int]) -> tuple[list[int], list[int]]:
    """Rows ``idx`` as (those the loss weighs, the others): under a loss whose every term lives on the
    teacher-signal tokens (:data:`agentopd.rl.objectives.TEACHER_ROWS_ONLY`) and no reference KL, rows
    without a teacher signal have no gradient, so no backward; one rank only (FSDP: every rank runs
    the same forwards)."""
    if not (cfg.algo.loss in objectives.TEACHER_ROWS_ONLY and st.ref_BT is None and distributed.world() == 1):
        return idx, []
    return [b for b in idx if st.teacher_mask_B[b] > 0], [b for b in idx if st.teacher_mask_B[b] == 0]


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


def score(cfg: Config, model, teacher, ref, amp, rows: TurnRows, teacher_prompts) -> Scores:
    """3. The student's, teacher's (on rows with a teacher prompt) and reference's log-probs of the
    same response ids, no grad (:class:`Scores`)."""
    T = learner_temperature(cfg.sampling)
    resp_ids = [g.response_ids for g in rows.turns]
    student_prompts = rows.prompt_ids

    def score(scorer, prompts, responses):  # repeated prompts forwarded once, as in the update (_forward)
        with distributed.gathered(scorer):  # FSDP: any number of forwards per rank
            return sequence_logprobs(scorer, prompts, responses, micro_batch=cfg.optim.micro_batch,
                                     chunk=cfg.optim.logits_chunk, temperature=T, share_prefix=cfg.optim.share_prompts)[0]

    topk, failed = None, []
    with torch.no_grad(), amp():
        student_lp = None if old_from_update(cfg, model) else score(model, student_prompts, resp_ids)
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


def is_served(teacher) -> bool:
    """Whether the teacher answers from a server (log-probs and its top-K, no model here)."""
    return teacher.mode == "served"


def update(cfg: Config, model, opt, teacher, head_VH, chunk: int, amp, st: StepBatch):
    """5. Micro-batches with gradient accumulation, ``optim.epochs_per_batch`` optimizer steps (the
    importance ratio corrects the later ones), then the teacher update: ``(loss, metric sums, grad norm)``."""
    model.train()
    B, W = len(st.response_ids), distributed.world()
    loss_sum, sums = 0.0, {"distill_loss": 0.0, "clipfrac": 0.0}
    starts = range(0, B, cfg.optim.micro_batch)
    divergence_teacher = (teacher.model_for_scoring() if "divergence" in objectives.needs(cfg.algo)
                          and not is_served(teacher) else None)
    with distributed.gathered(divergence_teacher):  # FSDP: the teacher's forwards need no collective
        for _ in range(cfg.optim.epochs_per_batch):
            opt.zero_grad(set_to_none=True)
            for s in starts:
                idx, rest = _weighted_rows(cfg, st, list(range(s, min(s + cfg.optim.micro_batch, B))))
                if rest and st.pending_old and st.mask_BT[rest].sum() > 0:  # their old log-probs, for the metrics
                    with torch.no_grad():
                        _forward(cfg, model, head_VH, chunk, amp, st, rest)
                empty = not idx or st.mask_BT[idx].sum() == 0
                if empty and W == 1:
                    continue
                with distributed.grad_sync(model, s == starts[-1]):
                    loss, met = (_idle_loss(model, amp), {}) if empty else _micro_batch_loss(
                        cfg, model, teacher, head_VH, chunk, amp, st, idx)
                    if loss.requires_grad:  # e.g. sdpo on a micro-batch with no teacher signal: nothing to learn
                        (loss * W).backward()  # the ranks' gradients are averaged: their sum is the batch's
                loss_sum += float(loss.detach())
                for k, v in met.items():
                    sums[k] = sums.get(k, 0.0) + v
            _settle_old(cfg, st)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
    teacher.update(model)
    sums = distributed.sum_dicts({"loss": loss_sum, **sums})
    return sums.pop("loss"), sums, float(distributed.full(gnorm))


def _idle_loss(model, amp) -> torch.Tensor:
    """Zero, through one forward of the model: a rank's micro-batch without tokens still takes part
    in the gradient reduction."""
    with amp():
        return 0.0 * response_logits(model, [[0]], [[0]]).float().sum()


def step_inputs(cfg: Config, rows: TurnRows, teacher_prompts, scores: Scores) -> tuple[StepBatch, dict]:
    """4. Advantages (judge errors and empty responses carry no gradient; reward-based estimators
    see each episode once, with its episode reward) and the rollout correction, packed for the
    update: ``(StepBatch, rollout metrics)``. Without the student's scores (``ls_BT`` None, see
    :func:`old_from_update`) the old log-probs, row-local advantages and the rollout correction are
    left to the update's first epoch, which fills the returned metrics dict in place."""
    from agentopd.rl import advantages

    ls_BT, mask_BT, lt_BT, ref_BT = scores.ls_BT, scores.mask_BT, scores.lt_BT, scores.ref_BT
    failed = set(scores.teacher_failed)  # a served teacher's errors: no signal
    teacher_prompts = [None if b in failed else tp for b, tp in enumerate(teacher_prompts)]
    pending = ls_BT is None
    ls_BT = torch.zeros_like(mask_BT) if pending else ls_BT
    rewards_B = torch.tensor(rows.rewards, dtype=torch.float32)
    teacher_mask_B = torch.tensor([tp is not None for tp in teacher_prompts], dtype=torch.float32)
    inputs = advantages.AdvantageInputs(rewards_B, torch.tensor(rows.groups), mask_BT, ls_BT, lt_BT, teacher_mask_B,
                                        torch.tensor(rows.success), torch.tensor(rows.episodes), torch.tensor(rows.turn_index))
    mask_BT = mask_BT * (~torch.isnan(rewards_B))[:, None]
    row_adv = pending and advantages.student_logprobs_scope(cfg.algo.advantage, cfg.algo.advantage_kwargs) == "row"
    adv_BT = torch.zeros_like(mask_BT) if row_adv else _advantages(cfg, inputs, mask_BT)
    engine_BT, engine_mask_BT = _engine_logprobs(rows.turns, ls_BT)
    rollout_BT, rollout_metrics = ((torch.ones_like(ls_BT), {}) if pending else objectives.rollout_weights(
        ls_BT, engine_BT, engine_mask_BT * mask_BT, cfg.algo.rollout_is_clip))
    st = StepBatch(rows.prompt_ids, [g.response_ids for g in rows.turns], teacher_prompts, ls_BT,
                   lt_BT, adv_BT, mask_BT, teacher_mask_B, rollout_BT, ref_BT, distributed.all_sum(mask_BT.sum()).clamp(min=1),
                   distributed.all_sum((mask_BT * teacher_mask_B[:, None]).sum()).clamp(min=1),  # all ranks' tokens
                   engine_BT, engine_mask_BT * mask_BT, pending, inputs if row_adv else None, rollout_metrics,
                   scores.teacher_topk)
    rollout_metrics["teacher_errors"] = len(failed)
    return st, rollout_metrics


def _advantages(cfg: Config, inputs, mask_BT: torch.Tensor) -> torch.Tensor:
    """``algo.advantage`` on ``inputs``, 0 outside ``mask_BT`` (the loss mask: judge errors out)."""
    from agentopd.rl import advantages

    return torch.nan_to_num(advantages.compute(cfg.algo.advantage, inputs, **cfg.algo.advantage_kwargs)) * mask_BT


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

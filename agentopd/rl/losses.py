"""Losses (DESIGN.md, "Self-teacher scoring and advantages"). All are token-means over the masked
tokens of the whole batch, and all distribution math is done in float32 (or float64 if given).

Distillation divergence ``KL_alpha(student, teacher)`` per position, with ``s`` the student's and
``t`` the teacher's next-token distribution (the convention of TRL's ``generalized_jsd_loss``,
where its ``beta`` is our ``alpha``):

- ``alpha = 0``: forward KL, ``KL(t || s) = sum t (log t - log s)`` (mass-covering);
- ``alpha = 1``: reverse KL, ``KL(s || t) = sum s (log s - log t)`` (mode-seeking);
- ``0 < alpha < 1``: generalized JSD, ``alpha * KL(t || m) + (1 - alpha) * KL(s || m)`` with the
  mixture ``m = alpha * t + (1 - alpha) * s`` (in probability space). At ``alpha = 0.5`` this is
  the ordinary Jensen-Shannon divergence. Note that, as in TRL, the mixed form tends to 0 (not to
  the KLs) as alpha approaches 0 or 1: the endpoints are special cases, not limits.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    mask_BT = mask_BT.to(values_BT.dtype)
    values_BT = torch.where(mask_BT > 0, values_BT, torch.zeros_like(values_BT))
    return (values_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1)


def _float(x: torch.Tensor) -> torch.Tensor:
    """float32 unless already float64."""
    return x if x.dtype == torch.float64 else x.float()


def tempered_logp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` in float32 (float64 if given); temperature 1 divides nothing."""
    logits = _float(logits)
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


# ---------------------------------------------------------------- policy-gradient terms


def ppo_per_token(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)``, ``r = exp(logprobs -
    old_logprobs)``; 0 outside ``mask_BT`` (whatever the inputs hold there). Returns ``(loss_BT,
    clipped_BT, ratio_BT)``: ``clipped_BT`` marks the tokens whose clipped branch is the active one."""
    mask_BT = mask_BT.bool()
    log_ratio_BT = torch.where(mask_BT, logprobs_BT - old_logprobs_BT.detach(), torch.zeros_like(logprobs_BT))
    ratio_BT = log_ratio_BT.exp()
    advantages_BT = torch.where(mask_BT, advantages_BT.detach(), torch.zeros_like(ratio_BT))
    unclipped_BT = ratio_BT * advantages_BT
    clipped_BT = ratio_BT.clamp(1 - clip_low, 1 + clip_high) * advantages_BT
    loss_BT = -torch.minimum(unclipped_BT, clipped_BT)
    return loss_BT, (clipped_BT < unclipped_BT).detach() & mask_BT, ratio_BT


def policy_loss(
    logprobs_BT: torch.Tensor,
    old_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean of :func:`ppo_per_token`. Metrics: ``clip_frac`` (tokens whose clipped branch is
    the active one), ``ratio_mean``."""
    loss_BT, is_clipped_BT, ratio_BT = ppo_per_token(logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT,
                                                     clip_low, clip_high)
    loss = _masked_mean(loss_BT, mask_BT)
    with torch.no_grad():
        metrics = {
            "clip_frac": _masked_mean(is_clipped_BT.to(ratio_BT.dtype), mask_BT).item(),
            "ratio_mean": _masked_mean(ratio_BT, mask_BT).item(),
        }
    return loss, metrics


def ref_kl_k3(logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Token-mean of the k3 estimator of KL(πθ || π_ref): ``exp(d) - d - 1``, ``d = ref - lp``."""
    d_BT = torch.where(mask_BT.bool(), ref_logprobs_BT.detach() - logprobs_BT, torch.zeros_like(logprobs_BT))
    return _masked_mean(d_BT.exp() - d_BT - 1, mask_BT)


def entropy_from_logits(logits_BTV: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Token-mean entropy of ``softmax(logits)``."""
    logp_BTV = F.log_softmax(_float(logits_BTV), dim=-1)
    entropy_BT = -(logp_BTV.exp() * logp_BTV).sum(-1)
    return _masked_mean(entropy_BT, mask_BT)


# ---------------------------------------------------------------- distillation divergences


def _kl(logp_NV: torch.Tensor, logq_NV: torch.Tensor) -> torch.Tensor:
    """KL(p || q) along the last axis, from log-probabilities."""
    return (logp_NV.exp() * (logp_NV - logq_NV)).sum(-1)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def alpha_divergence(student_logp_NV: torch.Tensor, teacher_logp_NV: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-position ``KL_alpha`` from normalised log-probabilities (see the module docstring)."""
    _check_alpha(alpha)
    if alpha == 0.0:
        return _kl(teacher_logp_NV, student_logp_NV)
    if alpha == 1.0:
        return _kl(student_logp_NV, teacher_logp_NV)
    mixture_logp_NV = torch.logaddexp(student_logp_NV + math.log(1 - alpha), teacher_logp_NV + math.log(alpha))
    return alpha * _kl(teacher_logp_NV, mixture_logp_NV) + (1 - alpha) * _kl(student_logp_NV, mixture_logp_NV)


def kl_alpha_per_token(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, alpha: float,
                       temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary ``KL_alpha(student, teacher)`` at each position, ``[B, T]``, both sides' logits
    divided by ``temperature``; the teacher side is detached."""
    student_logp_BTV = tempered_logp(student_logits_BTV, temperature)
    return alpha_divergence(student_logp_BTV, tempered_logp(teacher_logits_BTV.detach(), temperature), alpha)


def kl_alpha(
    student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, mask_BT: torch.Tensor, alpha: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Token-mean of :func:`kl_alpha_per_token`."""
    return _masked_mean(kl_alpha_per_token(student_logits_BTV, teacher_logits_BTV, alpha, temperature), mask_BT)


# ---------------------------------------------------------------- top-K: K categories plus a tail bucket


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends; ``x`` is clamped just below 0 so
    the result stays finite (an empty tail gets probability ~1e-12, not 0)."""
    x = x.clamp(max=-1e-12)
    near_zero = x > -math.log(2)
    from_expm1 = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    from_log1p = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, from_expm1, from_log1p)


def _with_tail(logp_NK: torch.Tensor) -> torch.Tensor:
    """K log-probabilities and, as a (K+1)-th category, the rest of the mass: ``log(1 - sum p)``."""
    return torch.cat([logp_NK, _log1mexp(logp_NK.logsumexp(-1, keepdim=True))], -1)


def _student_topk(student_logp_NV: torch.Tensor, teacher_logp_NV: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions over the student's top-``k`` tokens plus a tail bucket, ``[N, K + 1]`` each."""
    index_NK = student_logp_NV.detach().topk(min(k, student_logp_NV.shape[-1]), dim=-1).indices
    return _with_tail(student_logp_NV.gather(-1, index_NK)), _with_tail(teacher_logp_NV.gather(-1, index_NK))


def _teacher_topk(student_logp_NV: torch.Tensor, teacher_ids_NK: torch.Tensor,
                  teacher_logp_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions over the teacher's top-K tokens ``teacher_ids_NK`` (given with their
    log-probs ``teacher_logp_NK``) plus a tail bucket, ``[N, K + 1]`` each; the teacher side detached."""
    student_logp_NK = student_logp_NV.gather(-1, teacher_ids_NK)
    return _with_tail(student_logp_NK), _with_tail(_float(teacher_logp_NK.detach()))


def kl_alpha_topk_per_token(student_logits_BTV: torch.Tensor, teacher_logits_BTV: torch.Tensor, alpha: float,
                            k: int, temperature: float = 1.0) -> torch.Tensor:
    """``KL_alpha`` at each position, ``[B, T]``, over K+1 categories: the student's top-``k`` tokens,
    plus a tail bucket holding the rest of the mass (``log(1 - sum p_topk)``, for both distributions);
    both sides' logits divided by ``temperature``. With ``k = V`` (or ``V - 1``) it equals
    :func:`kl_alpha_per_token`."""
    student_logp_BTV = tempered_logp(student_logits_BTV, temperature)
    teacher_logp_BTV = tempered_logp(teacher_logits_BTV.detach(), temperature)
    return alpha_divergence(*_student_topk(student_logp_BTV, teacher_logp_BTV, k), alpha)


def kl_alpha_topk(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    mask_BT: torch.Tensor,
    alpha: float,
    k: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Token-mean of :func:`kl_alpha_topk_per_token`."""
    return _masked_mean(kl_alpha_topk_per_token(student_logits_BTV, teacher_logits_BTV, alpha, k, temperature), mask_BT)


def kl_alpha_teacher_topk_per_token(student_logits_BTV: torch.Tensor, teacher_ids_BTK: torch.Tensor,
                                    teacher_logprobs_BTK: torch.Tensor, alpha: float,
                                    temperature: float = 1.0) -> torch.Tensor:
    """``KL_alpha`` at each position, ``[B, T]``, over the TEACHER's top-K tokens plus a tail bucket:
    the teacher gives, per position, its K (distinct) token ids ``teacher_ids_BTK`` and their
    log-probs ``teacher_logprobs_BTK`` (as a server returns them, e.g. vLLM's ``prompt_logprobs``);
    the student's log-probs are read at those ids; each side gets the tail ``log(1 - sum p)``.
    TRL's ``topk_logits`` mode with a teacher server and ``distillation_add_tail``. The teacher's
    log-probs are used as given (normalised over the full vocabulary, detached):
    ``temperature`` divides the student's logits only, so ask the teacher for log-probs at the same
    temperature. With K = V it equals :func:`kl_alpha_per_token`. Every position is computed: give
    finite log-probs where the result is read (the chunked form reads only masked positions)."""
    student_logp_BTV = tempered_logp(student_logits_BTV, temperature)
    return alpha_divergence(*_teacher_topk(student_logp_BTV, teacher_ids_BTK, teacher_logprobs_BTK), alpha)


# ---------------------------------------------------------------- chunked: from final hidden states and the LM head


def _product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the LM-head product: autocast's where autocast is on, else float32 (float64 kept)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _head_logp(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T / temperature)``: the product in ``weight_VH``'s dtype (the
    caller casts the ``[V, H]`` head once, to :func:`_product_dtype`, not once per chunk), the
    log-softmax in float32."""
    with torch.autocast(hidden_NH.device.type, enabled=False):
        return tempered_logp(_float(hidden_NH.to(weight_VH.dtype) @ weight_VH.T), temperature)


def _over_chunks(fn: Callable, chunk: int, rows: tuple[torch.Tensor, ...], *shared) -> list:
    """``fn(*(x[s:s + chunk] for x in rows), *shared)`` for each chunk of rows. Under grad each call
    is checkpointed: its intermediates (a chunk of logits) are recomputed in backward, not kept."""
    run = (lambda *a: checkpoint(fn, *a, use_reentrant=False)) if torch.is_grad_enabled() else fn
    return [run(*(x[s : s + chunk] for x in rows), *shared) for s in range(0, rows[0].shape[0], chunk)]

def _masked_over_chunks(fn: Callable, chunk: int, mask_BT: torch.Tensor, rows_BTX: tuple[torch.Tensor, ...],
                        *shared) -> torch.Tensor:
    """``[B, T]`` float32: :func:`_over_chunks` of ``fn`` over the masked positions of ``rows_BTX``
    (``fn`` returns one value per position), 0 elsewhere. ``rows_BTX[0]`` is the student's: when
    nothing is masked in, the zeros still backpropagate into it."""
    mask_BT = mask_BT.bool()
    rows_N = tuple(x[mask_BT] for x in rows_BTX)
    parts = _over_chunks(fn, chunk, rows_N, *shared)
    out_BT = torch.zeros(mask_BT.shape, dtype=torch.float32, device=rows_N[0].device)
    if not parts:
        return out_BT + _float(rows_N[0]).sum() * 0.0
    return out_BT.index_put((mask_BT,), torch.cat(parts).to(out_BT.dtype))


def _chunk_divergence(
    student_hidden_NH: torch.Tensor,
    teacher_hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    teacher_weight_VH: torch.Tensor,
    alpha: float,
    temperature: float,
    k: int | None,
) -> torch.Tensor:
    """``KL_alpha`` of a chunk of positions from both sides' hidden states and heads: over the full
    vocabulary (``k`` None), or over the student's top-``k`` tokens plus a tail bucket."""
    student_logp_NV = _head_logp(student_hidden_NH, weight_VH, temperature)
    teacher_logp_NV = _head_logp(teacher_hidden_NH, teacher_weight_VH, temperature)
    if k is not None:
        return alpha_divergence(*_student_topk(student_logp_NV, teacher_logp_NV, k), alpha)
    return alpha_divergence(student_logp_NV, teacher_logp_NV, alpha)


def _chunk_teacher_topk_divergence(student_hidden_NH: torch.Tensor, teacher_ids_NK: torch.Tensor,
                                   teacher_logp_NK: torch.Tensor, weight_VH: torch.Tensor, alpha: float,
                                   temperature: float) -> torch.Tensor:
    """``KL_alpha`` of a chunk of positions over the teacher's top-K tokens plus a tail bucket."""
    student_logp_NV = _head_logp(student_hidden_NH, weight_VH, temperature)
    return alpha_divergence(*_teacher_topk(student_logp_NV, teacher_ids_NK, teacher_logp_NK), alpha)


def _kl_alpha_heads_chunked(
    student_hidden_BTH: torch.Tensor,
    teacher_hidden_BTH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    mask_BT: torch.Tensor,
    alpha: float,
    chunk: int,
    teacher_lm_head_weight_VH: torch.Tensor | None,
    temperature: float,
    k: int | None,
) -> torch.Tensor:
    """:func:`kl_alpha_chunked_per_token` (``k`` None) or :func:`kl_alpha_topk_chunked_per_token`."""
    _check_alpha(alpha)  # before any chunk runs: with nothing masked in, none does
    if teacher_lm_head_weight_VH is None:
        teacher_lm_head_weight_VH = lm_head_weight_VH
    dtype = _product_dtype(student_hidden_BTH)  # the [V, H] heads cast once, not once per chunk
    return _masked_over_chunks(_chunk_divergence, chunk, mask_BT, (student_hidden_BTH, teacher_hidden_BTH.detach()),
                               lm_head_weight_VH.to(dtype), teacher_lm_head_weight_VH.detach().to(dtype), alpha,
                               temperature, k)


def kl_alpha_chunked_per_token(
    student_hidden_BTH: torch.Tensor,
    teacher_hidden_BTH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    mask_BT: torch.Tensor,
    alpha: float,
    chunk: int = 128,
    teacher_lm_head_weight_VH: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """:func:`kl_alpha_per_token` of ``hidden @ weight.T / temperature`` logits at the masked
    positions (0 elsewhere), ``[B, T]`` float32, the logits formed ``chunk`` masked positions at a
    time (the product in the autocast dtype under autocast, else float32; log-softmax float32) and
    recomputed in backward (``torch.utils.checkpoint``), so no ``[B, T, V]`` tensor is ever
    held. Gradients reach ``student_hidden_BTH`` and ``lm_head_weight_VH``; the teacher side (hidden
    states, and ``teacher_lm_head_weight_VH``, default: the student's weight) is detached. The
    teacher's hidden size may differ from the student's (it only meets its own weight). ``mask_BT``
    is read as boolean."""
    return _kl_alpha_heads_chunked(student_hidden_BTH, teacher_hidden_BTH, lm_head_weight_VH, mask_BT, alpha, chunk,
                                   teacher_lm_head_weight_VH, temperature, None)


def kl_alpha_chunked(
    student_hidden_BTH: torch.Tensor,
    teacher_hidden_BTH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    mask_BT: torch.Tensor,
    alpha: float,
    chunk: int = 128,
    teacher_lm_head_weight_VH: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Token-mean of :func:`kl_alpha_chunked_per_token` (:func:`kl_alpha` of ``hidden @ weight.T``
    logits, never holding a ``[B, T, V]`` tensor)."""
    per_token_BT = kl_alpha_chunked_per_token(student_hidden_BTH, teacher_hidden_BTH, lm_head_weight_VH, mask_BT,
                                              alpha, chunk, teacher_lm_head_weight_VH, temperature)
    return _masked_mean(per_token_BT, mask_BT.bool())


def kl_alpha_topk_chunked_per_token(
    student_hidden_BTH: torch.Tensor,
    teacher_hidden_BTH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    mask_BT: torch.Tensor,
    alpha: float,
    k: int,
    chunk: int = 128,
    teacher_lm_head_weight_VH: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """:func:`kl_alpha_topk_per_token` of ``hidden @ weight.T`` logits (the student's top-``k``
    tokens plus a tail bucket) at the masked positions, 0 elsewhere, ``[B, T]`` float32, computed as
    :func:`kl_alpha_chunked_per_token` is: the logits formed ``chunk`` masked positions at a time and
    recomputed in backward, gradients to ``student_hidden_BTH`` and ``lm_head_weight_VH`` only."""
    return _kl_alpha_heads_chunked(student_hidden_BTH, teacher_hidden_BTH, lm_head_weight_VH, mask_BT, alpha, chunk,
                                   teacher_lm_head_weight_VH, temperature, k)


def kl_alpha_teacher_topk_chunked_per_token(
    student_hidden_BTH: torch.Tensor,
    lm_head_weight_VH: torch.Tensor,
    teacher_ids_BTK: torch.Tensor,
    teacher_logprobs_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    alpha: float,
    chunk: int = 128,
    temperature: float = 1.0,
) -> torch.Tensor:
    """:func:`kl_alpha_teacher_topk_per_token` of ``hidden @ weight.T`` logits at the masked
    positions, 0 elsewhere, ``[B, T]`` float32: the student's logits formed ``chunk`` masked
    positions at a time and recomputed in backward (as in :func:`kl_alpha_chunked_per_token`).
    ``temperature`` divides the student's logits only; the teacher's log-probs are used as given
    and detached, and are read only at masked positions (padding there may hold anything, e.g.
    ``-inf``). Gradients reach ``student_hidden_BTH`` and ``lm_head_weight_VH``."""
    _check_alpha(alpha)
    weight_VH = lm_head_weight_VH.to(_product_dtype(student_hidden_BTH))  # cast once, not once per chunk
    return _masked_over_chunks(_chunk_teacher_topk_divergence, chunk, mask_BT,
                               (student_hidden_BTH, teacher_ids_BTK, teacher_logprobs_BTK), weight_VH, alpha,
                               temperature)


def _chunk_logprobs(hidden_NH: torch.Tensor, target_N: torch.Tensor, weight_VH: torch.Tensor, topk: int,
                    temperature: float):
    logp_NV = _head_logp(hidden_NH, weight_VH, temperature)
    lp_N = logp_NV.gather(-1, target_N[:, None]).squeeze(-1)
    return (lp_N, *logp_NV.topk(topk, dim=-1)) if topk else (lp_N,)


def token_logprobs_chunked(
    hidden_NH: torch.Tensor, weight_VH: torch.Tensor, target_N: torch.Tensor, chunk: int = 128, topk: int = 0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Float32 log-probs of ``target_N`` under ``log_softmax(hidden_NH @ weight_VH.T / temperature)``,
    the logits formed ``chunk`` positions at a time (the product in the autocast dtype under
    autocast) and, under grad, recomputed in backward: no ``[N, V]`` tensor is held. Returns
    ``(lp_N, top)``; ``top`` is None, or with ``topk`` the ``(values_NK, indices_NK)`` of the K
    largest log-probs at each position (for use without grad)."""
    parts = _over_chunks(_chunk_logprobs, chunk, (hidden_NH, target_N), weight_VH.to(_product_dtype(hidden_NH)),
                         topk, temperature)
    if not parts:
        empty = hidden_NH.new_zeros(0, dtype=torch.float32)
        return empty, ((empty.new_zeros(0, topk), target_N.new_zeros(0, topk)) if topk else None)
    lp_N, *top = (torch.cat(x) for x in zip(*parts))
    return lp_N, (tuple(top) if topk else None)


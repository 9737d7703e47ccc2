"""Per-token objectives, chosen by ``algo.loss`` (DESIGN.md, "Self-teacher scoring and advantages").

An objective maps one micro-batch of response tokens (:class:`TokenBatch`) to named per-token loss
terms ``[B, T]``, each already weighted so that summing it over all micro-batches gives the token
mean over the whole batch. :func:`loss` is the one algorithm-agnostic part: every term times the
rollout-correction weight, summed. An objective is its term function plus what it needs the learner
to compute (``needs``): the per-token divergence to the teacher (``"divergence"``) or the teacher's
log-probs of the sampled tokens (``"teacher_logprobs"``).

- ``pg``: PPO-clip on ``algo.advantage``; with ``algo.distill_weight > 0`` it adds
  ``distill_weight * KL_alpha`` (the divergence, no importance weight: the behaviour before
  ``algo.loss`` existed).
- ``sdpo``: the distillation loss alone, as lasgroup/SDPO (``loss_mode=sdpo``) computes it: the
  per-token divergence (full vocabulary, or the student's top-K plus a tail bucket) times the
  detached ``min(exp(ls - ls_old), algo.is_clip)``.
- ``sdpo_token``: the sampled-token form of TRL's SDPOTrainer (``distillation_mode="sampled_token"``):
  ``(ls - lt).detach() * ls`` times the same importance weight; reverse KL only (alpha 1), as there.
- ``mix``: ``(1 - w) * pg + w * sdpo`` with ``w = algo.distill_weight`` (TRL's convex blend).
- ``opd``: on-policy distillation (gamma = 0: no credit through later tokens): at every sampled
  state the divergence to the teacher (reverse KL at ``distill_alpha = 1``) times the detached
  ``min(pi_theta / pi_old, is_clip)``, plus ``algo.trust_region`` times the k3 estimate of the
  forward KL to the policy before the update, ``KL(pi_old || pi_theta)``, at the sampled token
  (``r - 1 - log r`` with ``r = pi_theta / pi_old``: its gradient is the forward KL's in expectation
  over the old policy's samples).

Distillation terms average over the tokens of samples with a teacher signal, policy terms over all
masked tokens.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from agentopd.rl.losses import ppo_per_token

LOG_RATIO_BOUND = 20.0  # both references clamp the log importance ratio to [-20, 20] before exp
TEACHER_ROWS_ONLY = frozenset({"sdpo", "sdpo_token", "opd"})  # objectives whose every term is weighted by teacher_weight_BT


@dataclass
class TokenBatch:
    """One micro-batch of response tokens, ``[B, T]``, right-padded."""

    logprobs_BT: torch.Tensor  # the learner's log-probs of the sampled tokens, with grad, at the sampling temperature
    old_logprobs_BT: torch.Tensor  # the same before the update (detached)
    advantages_BT: torch.Tensor
    token_weight_BT: torch.Tensor  # mask / masked tokens of the whole batch
    teacher_weight_BT: torch.Tensor  # mask * teacher signal / such tokens of the whole batch
    rollout_weight_BT: torch.Tensor  # rollout correction (1 where off)
    state_weight_BT: torch.Tensor | None = None  # the weight of the state terms (None: rollout_weight_BT)
    teacher_logprobs_BT: torch.Tensor | None = None  # lt of the sampled tokens, at the sampling temperature
    divergence_BT: torch.Tensor | None = None  # KL_alpha(student, teacher) per position, with grad


Terms = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Objective:
    terms: Callable[[TokenBatch, object], Terms]
    needs: Callable[[object], frozenset]
    uses_advantage: bool
    state_terms: frozenset = frozenset()


OBJECTIVES: dict[str, Objective] = {}


def register(name: str, needs: Callable[[object], frozenset] = lambda algo: frozenset(), uses_advantage: bool = False,
             state_terms: frozenset = frozenset()):
    """Register an objective by name: ``needs(algo)`` says what the learner must compute for it
    (``"divergence"``, ``"teacher_logprobs"``), ``uses_advantage`` whether it reads ``algo.advantage``'s
    advantages (whose estimator may read the teacher too), ``state_terms`` which of its terms are an
    expectation over the actions at each state (weighted by ``state_weight_BT``: on stale rows the
    visitation correction alone, :mod:`agentopd.rl.offpolicy`)."""
    def wrap(fn: Callable[[TokenBatch, object], Terms]):
        OBJECTIVES[name] = Objective(fn, needs, uses_advantage, frozenset(state_terms))
        return fn

    return wrap


def needs(algo) -> frozenset:
    """What ``algo.loss`` needs beyond the learner's log-probs."""
    return OBJECTIVES[algo.loss].needs(algo)


def needs_teacher(algo) -> bool:
    """Whether the algorithm reads a teacher: its objective needs the teacher's log-probs or the
    divergence to it, or reads advantages from an estimator that reads the teacher."""
    from agentopd.rl.advantages import READS_TEACHER

    objective = OBJECTIVES[algo.loss]
    return bool(objective.needs(algo)) or (objective.uses_advantage and algo.advantage in READS_TEACHER)


def loss(algo, batch: TokenBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """This micro-batch's share of the whole batch's loss, and its share of the metrics (sums over
    micro-batches): ``<term>_loss`` per term and the objective's own (``clipfrac``, ``is_mean``, ...)."""
    objective = OBJECTIVES[algo.loss]
    terms, metrics = objective.terms(batch, algo)
    state_BT = batch.rollout_weight_BT if batch.state_weight_BT is None else batch.state_weight_BT
    out = {f"{k}_loss": (t * (state_BT if k in objective.state_terms else batch.rollout_weight_BT)).sum()
           for k, t in terms.items()}
    total = sum(out.values(), batch.logprobs_BT.new_zeros(()))
    return total, {k: float(v.detach()) for k, v in {**out, **metrics}.items()}


def truncated_ratio(log_ratio_BT: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached ``min(exp(log_ratio), clip)`` (log-ratio clamped to +-20 first) and where the clip
    binds; ``clip <= 0``: ones (off)."""
    log_ratio_BT = log_ratio_BT.detach().clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    if clip <= 0:
        return torch.ones_like(log_ratio_BT), torch.zeros_like(log_ratio_BT, dtype=torch.bool)
    ratio_BT = log_ratio_BT.exp()
    return ratio_BT.clamp(max=clip), ratio_BT > clip


def rollout_weights(old_logprobs_BT: torch.Tensor, engine_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor,
                    clip: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The rollout correction: ``min(exp(ls_old - l_engine), clip)`` on the tokens of ``mask_BT`` (those
    the engine gave a log-prob for), 1 elsewhere or with ``clip <= 0``; and the mismatch metrics
    ``rollout_logprob_diff`` (mean |ls_old - l_engine|), ``rollout_is_mean`` (mean weight applied),
    ``rollout_is_clipfrac`` (tokens where the clip binds)."""
    mask_BT = mask_BT.bool()
    diff_BT = torch.where(mask_BT, old_logprobs_BT - engine_logprobs_BT, torch.zeros_like(old_logprobs_BT))
    weight_BT, clipped_BT = truncated_ratio(diff_BT, clip)
    weight_BT = torch.where(mask_BT, weight_BT, torch.ones_like(weight_BT))
    n = mask_BT.sum().clamp(min=1)
    return weight_BT, {"rollout_logprob_diff": float(diff_BT.abs().sum() / n),
                       "rollout_is_mean": float(weight_BT[mask_BT].sum() / n) if mask_BT.any() else 1.0,
                       "rollout_is_clipfrac": float((clipped_BT & mask_BT).sum() / n)}


def _weighted(x_BT: torch.Tensor, weight_BT: torch.Tensor) -> torch.Tensor:
    """``x * weight``, 0 where the weight is 0 (whatever ``x`` holds there)."""
    return torch.where(weight_BT > 0, x_BT * weight_BT, torch.zeros_like(x_BT))


def _pg_terms(b: TokenBatch, algo) -> Terms:
    loss_BT, clipped_BT, _ = ppo_per_token(b.logprobs_BT, b.old_logprobs_BT, b.advantages_BT,
                                           b.token_weight_BT > 0, algo.clip_low, algo.clip_high)
    return {"pg": _weighted(loss_BT, b.token_weight_BT)}, {"clipfrac": (clipped_BT * b.token_weight_BT).sum()}


def _distill_terms(b: TokenBatch, per_token_BT: torch.Tensor, is_clip: float) -> Terms:
    """``per_token * min(exp(ls - ls_old), is_clip)`` (detached) on the teacher-signal tokens."""
    ratio_BT, clipped_BT = truncated_ratio(b.logprobs_BT - b.old_logprobs_BT, is_clip)
    w_BT = b.teacher_weight_BT
    return ({"distill": _weighted(per_token_BT * ratio_BT, w_BT)},
            {"is_mean": _weighted(ratio_BT, w_BT).sum(), "is_clipfrac": (clipped_BT * w_BT).sum()})


def _scaled(terms: Terms, c: float) -> Terms:
    return {k: c * t for k, t in terms[0].items()}, terms[1]


def _divergence(algo) -> frozenset:
    return frozenset({"divergence"})


@register("pg", needs=lambda algo: _divergence(algo) if algo.distill_weight else frozenset(), uses_advantage=True,
          state_terms={"distill"})
def pg(b: TokenBatch, algo) -> Terms:
    """PPO-clip on the advantages (+ ``distill_weight * KL_alpha``, no importance weight)."""
    terms, metrics = _pg_terms(b, algo)
    if algo.distill_weight:
        distill, _ = _scaled(_distill_terms(b, b.divergence_BT, 0.0), algo.distill_weight)
        terms = {**terms, **distill}
    return terms, metrics


@register("sdpo", needs=_divergence, state_terms={"distill"})
def sdpo(b: TokenBatch, algo) -> Terms:
    """The reference SDPO: the divergence to the teacher alone, importance-weighted (``is_clip``)."""
    return _distill_terms(b, b.divergence_BT, algo.is_clip)


@register("sdpo_token", needs=lambda algo: frozenset({"teacher_logprobs"}))
def sdpo_token(b: TokenBatch, algo) -> Terms:
    """TRL's sampled-token SDPO: ``(ls - lt).detach() * ls`` (its gradient is the policy gradient with
    advantage ``lt - ls``), importance-weighted (``is_clip``)."""
    per_token_BT = (b.logprobs_BT - b.teacher_logprobs_BT).detach() * b.logprobs_BT
    return _distill_terms(b, per_token_BT, algo.is_clip)


@register("mix", needs=_divergence, uses_advantage=True, state_terms={"distill"})
def mix(b: TokenBatch, algo) -> Terms:
    """``(1 - w) * pg + w * sdpo``, ``w = algo.distill_weight``."""
    w = algo.distill_weight
    (pg_t, pg_m), (sd_t, sd_m) = _scaled(_pg_terms(b, algo), 1 - w), _scaled(sdpo(b, algo), w)
    return {**pg_t, **sd_t}, {**pg_m, **sd_m}


@register("opd", needs=_divergence, state_terms={"distill"})
def opd(b: TokenBatch, algo) -> Terms:
    """On-policy distillation: the importance-weighted divergence to the teacher plus
    ``trust_region`` x ``KL(pi_old || pi_theta)`` (k3, at the sampled tokens), both on the
    teacher-signal tokens."""
    terms, metrics = _distill_terms(b, b.divergence_BT, algo.is_clip)
    if algo.trust_region:
        log_r_BT = (b.logprobs_BT - b.old_logprobs_BT).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        k3_BT = log_r_BT.exp() - 1 - log_r_BT
        terms["trust"] = _weighted(algo.trust_region * k3_BT, b.teacher_weight_BT)
    return terms, metrics

"""Off-policy rollouts: cached batches reused (``optim.reuse``) and rollouts sampled while the learner
updates (``run.async_steps``), both corrected by importance weights (docs/design.md, "Off-policy rollouts").

A row's *behaviour* policy ``mu`` sampled it (its engine's log-probs); the *current* policy ``pi`` is
the learner's before this update. With ``r_t = pi(a_t | s_t) / mu(a_t | s_t)`` and ``c =
algo.rollout_is_clip``:

- a policy-gradient token (its advantage carries the future) is weighted by ``min(r_t, c)``, the
  learner's rollout correction with the behaviour log-probs as the engine's;
- an enumerated distillation token (an expectation over the actions at ``s_t``, gamma = 0: no
  credit through later tokens) needs only the visitation correction ``min(prod_{k<t} r_k, c)``,
  how much likelier ``pi`` is to reach ``s_t``; or 1 with ``optim.reuse.visitation: false``;
- a batch's effective sample size ``ESS = (sum w)^2 / sum w^2`` over its tokens, as a fraction of
  them, says how stale it is: a cached batch below ``optim.reuse.min_ess`` is evicted, never used.

:class:`ReplayCache` keeps the last ``max_age`` steps' batches (their advantages and teacher
log-probs as computed when fresh; the behaviour log-probs frozen), and :func:`concat` joins them to
the fresh batch for one update.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from agentopd.rl import distributed
from agentopd.rl.objectives import LOG_RATIO_BOUND, OBJECTIVES


def log_ratios(current_BT: torch.Tensor, behaviour_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """``log pi - log mu`` per token, clamped to +-20, 0 outside ``mask_BT``."""
    d_BT = (current_BT - behaviour_BT).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return torch.where(mask_BT > 0, d_BT, torch.zeros_like(d_BT))


def visitation_log(log_r_BT: torch.Tensor) -> torch.Tensor:
    """``sum_{k<t} log r_k``: the log of the prefix product before each token (0 at the first)."""
    return (log_r_BT.cumsum(-1) - log_r_BT).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def visitation_weights(current_BT, behaviour_BT, mask_BT, clip: float) -> torch.Tensor:
    """``min(prod_{k<t} r_k, clip)`` on ``mask_BT`` (1 elsewhere; ones with ``clip <= 0``)."""
    if clip <= 0:
        return torch.ones_like(current_BT)
    w_BT = visitation_log(log_ratios(current_BT, behaviour_BT, mask_BT)).exp().clamp(max=clip)
    return torch.where(mask_BT > 0, w_BT, torch.ones_like(w_BT))


def ess_fraction(log_w_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """``(sum w)^2 / sum w^2 / n`` over the ``n`` tokens of ``mask_BT`` (untruncated weights, from
    their logs); 1.0 for a batch without tokens."""
    lw = log_w_BT[mask_BT > 0].double()
    if lw.numel() == 0:
        return 1.0
    w = (lw - lw.max()).exp()
    return float(w.sum() ** 2 / (w * w).sum() / lw.numel())


def weight_kinds(algo, visitation: bool) -> set[str]:
    """Which importance weights ``algo.loss`` applies to stale rows: ``token`` (its policy-gradient
    terms: the per-token ratio) and ``state`` (its enumerated distillation terms with visitation on:
    the prefix product)."""
    obj = OBJECTIVES[algo.loss]
    enumerated = bool(obj.state_terms) and "divergence" in obj.needs(algo)  # (pg: only with distill_weight)
    kinds = {"token"} if obj.uses_advantage or not enumerated else set()
    if enumerated and visitation:
        kinds.add("state")
    return kinds or {"token"}


def ess(algo, visitation: bool, current_BT, behaviour_BT, mask_BT) -> float:
    """The batch's ESS fraction under the weights its loss applies (the smaller where it applies both)."""
    log_r_BT = log_ratios(current_BT, behaviour_BT, mask_BT)
    got = {"token": lambda: ess_fraction(log_r_BT, mask_BT), "state": lambda: ess_fraction(visitation_log(log_r_BT), mask_BT)}
    return min(got[k]() for k in weight_kinds(algo, visitation))


def _pad(x_BT: torch.Tensor | None, T: int) -> torch.Tensor | None:
    return None if x_BT is None else torch.nn.functional.pad(x_BT, (0, T - x_BT.shape[1]))


def concat(batches: list):
    """One :class:`agentopd.rl.learner.Batch` of several (each with its old log-probs and advantages),
    its [B, T] tensors right-padded to the longest and its token counts those of the whole."""
    if len(batches) == 1:
        return batches[0]
    T = max(b.mask_BT.shape[1] for b in batches)
    cat = lambda name: torch.cat([_pad(getattr(b, name), T) for b in batches])
    mask_BT = cat("mask_BT")
    teacher_mask_B = torch.cat([b.teacher_mask_B for b in batches])
    stale_B = torch.cat([b.stale_B if b.stale_B is not None else torch.zeros(len(b.response_ids)) for b in batches])
    topk = [t for b in batches for t in (b.teacher_topk or [None] * len(b.response_ids))]
    return dataclasses.replace(
        batches[0], prompt_ids=[p for b in batches for p in b.prompt_ids],
        response_ids=[r for b in batches for r in b.response_ids],
        teacher_prompts=[p for b in batches for p in b.teacher_prompts], mask_BT=mask_BT,
        teacher_mask_B=teacher_mask_B, teacher_BT=cat("teacher_BT"),
        ref_BT=cat("ref_BT") if batches[0].ref_BT is not None else None, engine_BT=cat("engine_BT"),
        engine_mask_BT=cat("engine_mask_BT"), n_tok=distributed.all_sum(mask_BT.sum()).clamp(min=1),
        n_teacher_tok=distributed.all_sum((mask_BT * teacher_mask_B[:, None]).sum()).clamp(min=1),
        old_BT=cat("old_BT"), adv_BT=cat("adv_BT"), adv_inputs=None,
        teacher_topk=topk if batches[0].teacher_topk is not None else None, stale_B=stale_B)


@dataclass
class Reuse:
    """What one update drew from the cache: the batches used (current log-probs as their old ones)
    and its metrics (``reuse_*``)."""

    batches: list
    metrics: dict


@dataclass
class ReplayCache:
    """The last ``max_age`` steps' batches, with the step each was sampled at (module docstring)."""

    max_age: int
    min_ess: float
    visitation: bool
    entries: list = field(default_factory=list)  # (step, Batch with its behaviour log-probs as engine_BT)
    cached: int = 0  # batches ever cached, and evicted by ESS: the fraction evicted
    evicted: int = 0

    def add(self, step: int, batch, behaviour_BT: torch.Tensor, adv_BT: torch.Tensor) -> None:
        """Keep ``batch`` (sampled at ``step``; its rows' behaviour log-probs and advantages) for reuse."""
        if self.max_age <= 0:
            return
        mask_BT = batch.mask_BT
        self.entries.append((step, dataclasses.replace(
            batch, engine_BT=behaviour_BT * mask_BT, engine_mask_BT=mask_BT.clone(), adv_BT=adv_BT * mask_BT,
            adv_inputs=None, old_BT=None, stale_B=torch.ones(len(batch.response_ids)))))
        self.cached += 1

    def draw(self, step: int, algo, current) -> Reuse:
        """The cached batches an update at ``step`` uses: at most ``max_age`` steps old, ESS at least
        ``min_ess`` under ``current(batch) -> [B, T]`` (the current policy's log-probs of its rows,
        which become its old log-probs); the others are dropped for good."""
        self.entries = [(s, b) for s, b in self.entries if step - s <= self.max_age]
        keep, used, fracs, ages, evicted = [], [], [], [], 0
        for s, b in self.entries:
            cur_BT = current(b)
            frac = ess(algo, self.visitation, cur_BT, b.engine_BT, b.mask_BT)
            fracs.append(frac)
            if frac < self.min_ess:
                evicted += 1
                continue
            keep.append((s, b))
            used.append(dataclasses.replace(b, old_BT=cur_BT * b.mask_BT))
            ages.append(step - s)
        self.entries, self.evicted = keep, self.evicted + evicted
        return Reuse(used, {"reuse_batches": len(used), "reuse_evicted": evicted,
                            "reuse_evicted_frac": self.evicted / max(self.cached, 1),
                            "reuse_age_mean": sum(ages) / len(ages) if ages else 0.0,
                            **({"reuse_ess_min": min(fracs), "reuse_ess_mean": sum(fracs) / len(fracs)}
                               if fracs else {})})

    def state_dict(self) -> dict:
        """The cache as plain tensors, lists and numbers (``torch.load(weights_only=True)`` reads it)."""
        return {"cached": self.cached, "evicted": self.evicted,
                "entries": [{"step": s, **{f.name: getattr(b, f.name) for f in dataclasses.fields(b)}}
                            for s, b in self.entries]}

    def load_state_dict(self, state: dict, batch_cls) -> None:
        self.cached, self.evicted = state["cached"], state["evicted"]
        self.entries = [(e.pop("step"), batch_cls(**e)) for e in (dict(x) for x in state["entries"])]

"""Advantage estimators (DESIGN.md, "Self-teacher scoring and advantages").

Every estimator maps an :class:`AdvantageInputs` to ``advantages_BT``: one advantage per response
token, 0 outside ``mask_BT``. Pick one by name::

    advantages_BT = compute("sd_to_go", inputs, baseline=True)

Notation: ``ls_t = log πθ(y_t | x, y<t)`` (student), ``lt_t = log πT(y_t | c, y<t)`` (teacher,
``c`` = prompt + critique [+ demonstration]).

Conventions shared by all estimators:

- A sample whose reward is NaN (``judge_error``) gets advantage 0 everywhere and takes no part in
  any group statistic or baseline. The caller also drops it from the loss mask.
- Group statistics (mean, std, leave-one-out means) are taken over the valid samples of the group.
- Multi-turn (``episode_B`` given, a row per turn): reward-based statistics count each episode once
  (its reward is every one of its rows' reward), and ``sd_to_go`` sums over the later turns of the
  episode too, over their sampled tokens only (the feedback between turns is in the prompts).
- Self-distillation estimators give 0 to samples with ``teacher_mask_B == 0`` (no critique and no
  demonstration: no teacher signal) and leave them out of baselines.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

EPS = 1e-6


@dataclass
class AdvantageInputs:
    rewards_B: torch.Tensor  # float; NaN = judge_error
    group_B: torch.Tensor  # long: the prompt group of each sample
    mask_BT: torch.Tensor  # 1 on response tokens
    student_logprobs_BT: torch.Tensor | None = None  # ls_t (detached)
    teacher_logprobs_BT: torch.Tensor | None = None  # lt_t (detached)
    teacher_mask_B: torch.Tensor | None = None  # 1 where the sample has a teacher signal
    success_B: torch.Tensor | None = None  # bool, for hybrid routing
    episode_B: torch.Tensor | None = None  # long: the episode of each row (a row is one turn); None: one row each
    turn_B: torch.Tensor | None = None  # long: the row's turn in its episode (0-based)

    def rows(self, idx: list[int], **replace) -> AdvantageInputs:
        """These rows only (every tensor indexed by ``idx``), with the fields in ``replace`` swapped in."""
        got = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return AdvantageInputs(**{**got, **replace})


ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {}
READS_TEACHER: set[str] = set()
"""The estimators that read the teacher's log-probs (their rows need a teacher context)."""


def register(name: str, reads_teacher: bool = False):
    """Register an estimator ``fn(inputs: AdvantageInputs, **kwargs) -> advantages [B, T]`` by name;
    ``reads_teacher``: it reads ``inputs.teacher_logprobs_BT`` (the learner then builds teacher contexts)."""
    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        ADVANTAGES[name] = fn
        if reads_teacher:
            READS_TEACHER.add(name)
        return fn

    return wrap


def compute(name: str, inputs: AdvantageInputs, **kwargs) -> torch.Tensor:
    """Advantages ``[B, T]`` from the estimator ``name``; 0 outside the mask and on NaN rewards."""
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; choices: {sorted(ADVANTAGES)}")
    advantages_BT = ADVANTAGES[name](inputs, **kwargs)
    keep_BT = inputs.mask_BT.to(advantages_BT.dtype) * _valid_B(inputs)[:, None]
    return torch.where(keep_BT > 0, advantages_BT, torch.zeros_like(advantages_BT))


def student_logprobs_scope(name: str, kwargs: dict) -> str:
    """How estimator ``name`` reads the student's log-probs: ``"none"`` (reward-based), ``"row"``
    (each row's advantages from that row's own log-probs alone: ``sd_token`` without ``center``, so
    they can be formed micro-batch by micro-batch) or ``"batch"`` (``sd_token`` with ``center``: a
    batch mean; ``sd_to_go``: later turns and a group baseline; ``hybrid``: group statistics)."""
    if name in ("grpo", "rloo"):
        return "none"
    return "row" if name == "sd_token" and not kwargs.get("center", False) else "batch"


# ---------------------------------------------------------------- helpers


def _valid_B(inputs: AdvantageInputs) -> torch.Tensor:
    """1.0 where the sample was judged (reward not NaN), else 0.0."""
    return (~torch.isnan(inputs.rewards_B)).to(inputs.rewards_B.dtype)


def _group_index_B(group_B: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Group ids relabelled 0..G-1, and G."""
    _, index_B = torch.unique(group_B, return_inverse=True)
    return index_B, int(index_B.max()) + 1 if index_B.numel() else 0


def _group_sum(values_BX: torch.Tensor, index_B: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Sum of each group's rows, handed back to every member: ``[B, ...]``."""
    sums_GX = values_BX.new_zeros((num_groups, *values_BX.shape[1:]))
    return sums_GX.index_add(0, index_B, values_BX)[index_B]


def _broadcast(advantages_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return advantages_B[:, None] * mask_BT.to(advantages_B.dtype)


def _log_ratio_BT(inputs: AdvantageInputs) -> torch.Tensor:
    """``lt_t - ls_t`` on masked tokens of samples with a teacher signal, 0 elsewhere."""
    if inputs.student_logprobs_BT is None or inputs.teacher_logprobs_BT is None:
        raise ValueError("self-distillation advantages need student_logprobs_BT and teacher_logprobs_BT")
    diff_BT = (inputs.teacher_logprobs_BT - inputs.student_logprobs_BT).detach()
    keep_BT = inputs.mask_BT.to(diff_BT.dtype) * _teacher_valid_B(inputs, diff_BT.dtype)[:, None]
    return torch.where(keep_BT > 0, diff_BT, torch.zeros_like(diff_BT))


def _teacher_valid_B(inputs: AdvantageInputs, dtype: torch.dtype) -> torch.Tensor:
    valid_B = _valid_B(inputs).to(dtype)
    if inputs.teacher_mask_B is not None:
        valid_B = valid_B * inputs.teacher_mask_B.to(dtype)
    return valid_B


# ---------------------------------------------------------------- estimators


def _per_episode(estimator):
    """Run a reward-based estimator on one row per episode and hand each episode's advantage to all
    of its rows (a no-op without ``episode_B``)."""

    def run(inputs: AdvantageInputs, **kw) -> torch.Tensor:
        if inputs.episode_B is None:
            return estimator(inputs, **kw)
        _, row_B = torch.unique(inputs.episode_B, return_inverse=True)
        first_E = torch.full((int(row_B.max()) + 1 if row_B.numel() else 0,), len(row_B), dtype=torch.long)
        first_E = first_E.scatter_reduce(0, row_B, torch.arange(len(row_B)), reduce="amin")
        one = AdvantageInputs(inputs.rewards_B[first_E], inputs.group_B[first_E], torch.ones(len(first_E), 1))
        return estimator(one, **kw)[:, 0][row_B][:, None] * inputs.mask_BT.to(torch.float32)

    run.__doc__, run.__wrapped__ = estimator.__doc__, estimator
    return run


@register("grpo")
@_per_episode
def grpo(inputs: AdvantageInputs, std_normalize: bool = True) -> torch.Tensor:
    """``(R_i - mean_g R) / (std_g R + eps)``, the same for every token. ``std_g`` is the
    population std (divides by n, so a group of one gives 0, not NaN)."""
    valid_B = _valid_B(inputs)
    rewards_B = torch.nan_to_num(inputs.rewards_B, nan=0.0) * valid_B
    index_B, num_groups = _group_index_B(inputs.group_B)
    count_B = _group_sum(valid_B, index_B, num_groups).clamp(min=1)
    mean_B = _group_sum(rewards_B, index_B, num_groups) / count_B
    centered_B = (rewards_B - mean_B) * valid_B
    if std_normalize:
        std_B = (_group_sum(centered_B**2, index_B, num_groups) / count_B).sqrt()
        centered_B = centered_B / (std_B + EPS)
    return _broadcast(centered_B, inputs.mask_BT)


@register("rloo")
@_per_episode
def rloo(inputs: AdvantageInputs) -> torch.Tensor:
    """``R_i - mean_{j != i} R_j`` over the valid samples of the group; 0 for a group of one."""
    valid_B = _valid_B(inputs)
    rewards_B = torch.nan_to_num(inputs.rewards_B, nan=0.0) * valid_B
    index_B, num_groups = _group_index_B(inputs.group_B)
    others_count_B = _group_sum(valid_B, index_B, num_groups) - valid_B
    others_mean_B = (_group_sum(rewards_B, index_B, num_groups) - rewards_B) / others_count_B.clamp(min=1)
    advantages_B = torch.where(others_count_B > 0, rewards_B - others_mean_B, torch.zeros_like(rewards_B))
    return _broadcast(advantages_B * valid_B, inputs.mask_BT)


@register("sd_token", reads_teacher=True)
def sd_token(inputs: AdvantageInputs, clamp: float | None = None, center: bool = False) -> torch.Tensor:
    """SDPO: ``lt_t - ls_t`` per token (biased: ignores the effect of y_t on later tokens; low
    variance). ``clamp`` bounds its absolute value. ``center`` subtracts the batch mean over the
    tokens with a teacher signal: a constant baseline, which leaves each token's expected gradient
    unchanged (the score function has mean zero under the policy), but stops a teacher that is on
    average less sure in its longer context from pushing down every sampled token at once."""
    advantages_BT = _log_ratio_BT(inputs)
    if center:
        keep_BT = inputs.mask_BT.to(advantages_BT.dtype) * _teacher_valid_B(inputs, advantages_BT.dtype)[:, None]
        mean = (advantages_BT * keep_BT).sum() / keep_BT.sum().clamp(min=1)
        advantages_BT = (advantages_BT - mean) * keep_BT
    if clamp is not None:
        advantages_BT = advantages_BT.clamp(-clamp, clamp)
    return advantages_BT


@register("sd_to_go", reads_teacher=True)
def sd_to_go(inputs: AdvantageInputs, baseline: bool = False) -> torch.Tensor:
    """``A_t = sum_{t' >= t} (lt_t' - ls_t')`` over masked tokens: with it, the expected policy
    gradient equals the gradient of the sequence-level reverse KL(πθ || πT) (unbiased).

    ``baseline=True`` subtracts, at each position t, the mean of ``A_t`` over the OTHER samples of
    the group that have a token at t (leave-one-out; 0 if there is none). Because it depends only
    on independent sibling samples, it keeps the gradient unbiased; a mean that included the
    sample itself, or a mean over the sample's own positions, would not. Positions are compared by
    column index, so responses should be aligned at their first token (right padding).
    """
    diff_BT = _log_ratio_BT(inputs)
    advantages_BT = diff_BT.flip(-1).cumsum(-1).flip(-1) + _later_turns_B(inputs, diff_BT.sum(-1))[:, None]
    mask_BT = inputs.mask_BT.to(diff_BT.dtype)
    if baseline:
        member_BT = mask_BT * _teacher_valid_B(inputs, diff_BT.dtype)[:, None]
        index_B, num_groups = _group_index_B(inputs.group_B)
        own_BT = advantages_BT * member_BT
        others_count_BT = _group_sum(member_BT, index_B, num_groups) - member_BT
        others_sum_BT = _group_sum(own_BT, index_B, num_groups) - own_BT
        baseline_BT = torch.where(
            others_count_BT > 0, others_sum_BT / others_count_BT.clamp(min=1), torch.zeros_like(own_BT)
        )
        advantages_BT = (advantages_BT - baseline_BT) * member_BT
    return advantages_BT * mask_BT


def _later_turns_B(inputs: AdvantageInputs, total_B: torch.Tensor) -> torch.Tensor:
    """For each row, the sum of ``total_B`` over the later turns of its episode (0 without ``episode_B``)."""
    if inputs.episode_B is None or inputs.turn_B is None:
        return torch.zeros_like(total_B)
    same_BB = inputs.episode_B[:, None] == inputs.episode_B[None, :]
    later_BB = inputs.turn_B[None, :] > inputs.turn_B[:, None]
    return (same_BB & later_BB).to(total_B.dtype) @ total_B


@register("hybrid", reads_teacher=True)
def hybrid(
    inputs: AdvantageInputs,
    mode: str = "sum",
    lam: float = 1.0,
    std_normalize: bool = True,
    clamp: float | None = None,
    center: bool = False,
) -> torch.Tensor:
    """``mode="sum"``: ``grpo + lam * sd_token``. ``mode="route"``: samples with ``success_B``
    get grpo (group statistics over the whole group), the others get sd_token."""
    grpo_BT = grpo(inputs, std_normalize=std_normalize)
    sd_BT = sd_token(inputs, clamp=clamp, center=center)
    if mode == "sum":
        return grpo_BT + lam * sd_BT
    if mode == "route":
        if inputs.success_B is None:
            raise ValueError("hybrid mode='route' needs success_B")
        return torch.where(inputs.success_B.bool()[:, None], grpo_BT, sd_BT)
    raise ValueError(f"unknown hybrid mode {mode!r}; choices: ['route', 'sum']")

"""Advantage estimators against numbers worked out by hand, and the theory behind sd_to_go:
on an enumerable toy, its expected policy gradient IS the gradient of the sequence-level reverse
KL, while sd_token's is only the myopic (per-token) part of it."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from agentopd.rl.advantages import ADVANTAGES, AdvantageInputs, compute
from agentopd.rl.losses import kl_alpha, policy_loss

NAN = float("nan")


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


# ---------------------------------------------------------------- reward-based estimators
# Two groups of three. Group 1 holds a judge_error (NaN) sample; masks have padding.
REWARDS_B = t([1.0, 0.0, 0.5, 1.0, NAN, 0.0])
GROUP_B = torch.tensor([7, 7, 7, 3, 3, 3])  # arbitrary ids
MASK_BT = t([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]])


def reward_inputs() -> AdvantageInputs:
    return AdvantageInputs(rewards_B=REWARDS_B, group_B=GROUP_B, mask_BT=MASK_BT)


def per_sample(values_B):
    """Broadcast hand-computed per-sample advantages over the mask."""
    return t(values_B)[:, None] * MASK_BT


def test_grpo_by_hand():
    # group 7: R = 1, 0, .5 -> mean .5, population std sqrt(1/6)
    # group 3: R = 1, (NaN), 0 -> mean .5, std .5; the NaN sample gets 0
    s7, s3 = math.sqrt(1 / 6) + 1e-6, 0.5 + 1e-6
    expected = per_sample([0.5 / s7, -0.5 / s7, 0.0, 0.5 / s3, 0.0, -0.5 / s3])
    got = compute("grpo", reward_inputs())
    torch.testing.assert_close(got, expected)
    assert got[0, 0].item() == pytest.approx(1.2247, abs=1e-4)


def test_grpo_without_std():
    expected = per_sample([0.5, -0.5, 0.0, 0.5, 0.0, -0.5])
    torch.testing.assert_close(compute("grpo", reward_inputs(), std_normalize=False), expected)


def test_grpo_constant_group_gives_zero():
    inputs = AdvantageInputs(rewards_B=t([1.0, 1.0, 0.0]), group_B=torch.tensor([0, 0, 1]), mask_BT=torch.ones(3, 2))
    torch.testing.assert_close(compute("grpo", inputs), torch.zeros(3, 2))


def test_rloo_by_hand():
    # group 7: 1 - mean(0, .5) = .75;  0 - mean(1, .5) = -.75;  .5 - mean(1, 0) = 0
    # group 3 (NaN left out): 1 - 0 = 1;  NaN -> 0;  0 - 1 = -1
    expected = per_sample([0.75, -0.75, 0.0, 1.0, 0.0, -1.0])
    torch.testing.assert_close(compute("rloo", reward_inputs()), expected)


def test_rloo_group_of_one_gives_zero():
    inputs = AdvantageInputs(
        rewards_B=t([1.0, 0.3, 0.9, NAN]), group_B=torch.tensor([0, 1, 2, 2]), mask_BT=torch.ones(4, 3)
    )
    torch.testing.assert_close(compute("rloo", inputs), torch.zeros(4, 3))


# ---------------------------------------------------------------- self-distillation estimators
# One group of three samples, T = 3.  d = lt - ls:
#   sample 0: [ .5, -.25,  1 ]   mask [1, 1, 1]
#   sample 1: [ -1,  0,    2 ]   mask [1, 1, 0]  (the 2 is padding and must not count)
#   sample 2: [  0,  .5,  -1 ]   mask [1, 1, 1]
LS_BT = t([[-1.0, -2.0, -1.5], [-0.2, -0.3, -3.0], [-1.0, -1.0, -1.0]])
LT_BT = t([[-0.5, -2.25, -0.5], [-1.2, -0.3, -1.0], [-1.0, -0.5, -2.0]])
SD_MASK_BT = t([[1, 1, 1], [1, 1, 0], [1, 1, 1]])


def sd_inputs(**overrides) -> AdvantageInputs:
    fields = {
        "rewards_B": t([1.0, 0.0, 0.0]),
        "group_B": torch.tensor([0, 0, 0]),
        "mask_BT": SD_MASK_BT,
        "student_logprobs_BT": LS_BT,
        "teacher_logprobs_BT": LT_BT,
    }
    return AdvantageInputs(**{**fields, **overrides})


def test_sd_token_by_hand():
    expected = t([[0.5, -0.25, 1.0], [-1.0, 0.0, 0.0], [0.0, 0.5, -1.0]])
    torch.testing.assert_close(compute("sd_token", sd_inputs()), expected)


def test_sd_token_clamp_and_teacher_mask():
    got = compute("sd_token", sd_inputs(teacher_mask_B=t([1, 1, 0])), clamp=0.4)
    expected = t([[0.4, -0.25, 0.4], [-0.4, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, expected)


def test_sd_token_center_subtracts_the_mean_over_teacher_tokens():
    got = compute("sd_token", sd_inputs(teacher_mask_B=t([1, 1, 0])), center=True)
    # teacher tokens (rows 0-1 on the mask): 0.5, -0.25, 1.0, -1.0, 0.0 -> mean 0.05
    m = 0.05
    expected = t([[0.5 - m, -0.25 - m, 1.0 - m], [-1.0 - m, -m, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, expected)


def test_nan_reward_zeroes_self_distillation_too():
    got = compute("sd_token", sd_inputs(rewards_B=t([1.0, NAN, 0.0])))
    expected = t([[0.5, -0.25, 1.0], [0.0, 0.0, 0.0], [0.0, 0.5, -1.0]])
    torch.testing.assert_close(got, expected)


def test_sd_to_go_by_hand():
    # reverse cumulative sums of the masked d
    expected = t([[1.25, 0.75, 1.0], [-1.0, 0.0, 0.0], [-0.5, -0.5, -1.0]])
    torch.testing.assert_close(compute("sd_to_go", sd_inputs()), expected)


def test_sd_to_go_leave_one_out_baseline_by_hand():
    # A = [[1.25, .75, 1], [-1, 0, (pad)], [-.5, -.5, -1]]; baseline at (i, t) = mean of A[j, t]
    # over the other samples j with a token at t.
    expected = t(
        [
            [1.25 - (-1.0 - 0.5) / 2, 0.75 - (0.0 - 0.5) / 2, 1.0 - (-1.0)],
            [-1.0 - (1.25 - 0.5) / 2, 0.0 - (0.75 - 0.5) / 2, 0.0],
            [-0.5 - (1.25 - 1.0) / 2, -0.5 - (0.75 + 0.0) / 2, -1.0 - 1.0],
        ]
    )
    torch.testing.assert_close(compute("sd_to_go", sd_inputs(), baseline=True), expected)
    # A sample without teacher signal gets 0 and leaves the baseline of the others.
    got = compute("sd_to_go", sd_inputs(teacher_mask_B=t([1, 0, 1])), baseline=True)
    expected = t([[1.25 + 0.5, 0.75 + 0.5, 1.0 + 1.0], [0.0, 0.0, 0.0], [-0.5 - 1.25, -0.5 - 0.75, -1.0 - 1.0]])
    torch.testing.assert_close(got, expected)


def test_sd_to_go_baseline_is_per_group():
    # Two groups of one: no sibling, so no baseline.
    got = compute("sd_to_go", sd_inputs(group_B=torch.tensor([0, 1, 2])), baseline=True)
    torch.testing.assert_close(got, compute("sd_to_go", sd_inputs()))


def test_hybrid_sum_and_route_by_hand():
    # grpo on R = 1, 0, 0: mean 1/3, population std sqrt(2)/3 -> sqrt(2), -1/sqrt(2), -1/sqrt(2)
    g0, g1 = (2 / 3) / (math.sqrt(2) / 3 + 1e-6), -(1 / 3) / (math.sqrt(2) / 3 + 1e-6)
    got = compute("hybrid", sd_inputs(), mode="sum", lam=0.5)
    expected = t(
        [
            [g0 + 0.25, g0 - 0.125, g0 + 0.5],
            [g1 - 0.5, g1, 0.0],
            [g1, g1 + 0.25, g1 - 0.5],
        ]
    )
    torch.testing.assert_close(got, expected)
    assert g0 == pytest.approx(math.sqrt(2), abs=1e-5)

    got = compute("hybrid", sd_inputs(success_B=torch.tensor([True, False, False])), mode="route")
    expected = t([[g0, g0, g0], [-1.0, 0.0, 0.0], [0.0, 0.5, -1.0]])
    torch.testing.assert_close(got, expected)


def test_hybrid_route_needs_success():
    with pytest.raises(ValueError, match="success_B"):
        compute("hybrid", sd_inputs(), mode="route")


def test_unknown_estimator_names_the_choices():
    with pytest.raises(ValueError) as err:
        compute("ppo", reward_inputs())
    for name in ("grpo", "rloo", "sd_token", "sd_to_go", "hybrid"):
        assert name in ADVANTAGES and name in str(err.value)


def test_zero_outside_mask():
    for name in ADVANTAGES:
        got = compute(name, sd_inputs(success_B=torch.tensor([True, False, False])))
        assert (got[SD_MASK_BT == 0] == 0).all(), name


# ---------------------------------------------------------------- theory on an enumerable toy
# Vocabulary 3, length 2. Student: tabular softmax policy with logits theta1 [3] for y1 and
# theta2 [3, 3] for y2 | y1. Teacher: another fixed tabular policy. All 9 sequences enumerated.

V = 3
SEQUENCES = list(itertools.product(range(V), repeat=2))


@pytest.fixture
def toy():
    gen = torch.Generator().manual_seed(0)
    theta1 = torch.randn(V, generator=gen, dtype=torch.float64, requires_grad=True)
    theta2 = torch.randn(V, V, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher1 = torch.randn(V, generator=gen, dtype=torch.float64)
    teacher2 = torch.randn(V, V, generator=gen, dtype=torch.float64)
    return theta1, theta2, teacher1, teacher2


def seq_logprobs(logits1, logits2, y):
    """[log p(y1), log p(y2 | y1)] as a [1, 2] tensor."""
    y1, y2 = y
    return torch.stack([logits1.log_softmax(-1)[y1], logits2[y1].log_softmax(-1)[y2]])[None]


def grad(value, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])


def sequence_reverse_kl(theta1, theta2, teacher1, teacher2):
    kl = 0.0
    for y in SEQUENCES:
        ls = seq_logprobs(theta1, theta2, y).sum()
        lt = seq_logprobs(teacher1, teacher2, y).sum()
        kl = kl + ls.exp() * (ls - lt)
    return kl


def expected_pg_loss(estimator, theta1, theta2, teacher1, teacher2):
    """E_{y ~ πθ}[policy loss] with exact weights; its gradient is the expected policy gradient
    (weights detached: the score function lives in the loss, as in sampling)."""
    total = 0.0
    for y in SEQUENCES:
        ls_BT = seq_logprobs(theta1, theta2, y)
        inputs = AdvantageInputs(
            rewards_B=torch.zeros(1, dtype=torch.float64),
            group_B=torch.zeros(1, dtype=torch.long),
            mask_BT=torch.ones(1, 2, dtype=torch.float64),
            student_logprobs_BT=ls_BT.detach(),
            teacher_logprobs_BT=seq_logprobs(teacher1, teacher2, y),
        )
        advantages_BT = compute(estimator, inputs)
        loss, _ = policy_loss(ls_BT, ls_BT.detach(), advantages_BT, inputs.mask_BT)
        total = total + ls_BT.sum().exp().detach() * loss * 2  # token-mean over T=2 -> sum
    return total


def test_sd_to_go_policy_gradient_is_the_sequence_reverse_kl_gradient(toy):
    params = list(toy[:2])
    grad_kl = grad(sequence_reverse_kl(*toy), params)
    grad_to_go = grad(expected_pg_loss("sd_to_go", *toy), params)
    assert grad_kl.abs().max() > 1e-2  # not a trivially-zero case
    torch.testing.assert_close(grad_to_go, grad_kl, rtol=1e-10, atol=1e-12)


def test_sd_token_policy_gradient_is_only_the_myopic_term(toy):
    theta1, theta2, teacher1, teacher2 = toy
    params = [theta1, theta2]
    grad_kl = grad(sequence_reverse_kl(*toy), params)
    grad_token = grad(expected_pg_loss("sd_token", *toy), params)
    assert not torch.allclose(grad_token, grad_kl, rtol=1e-3, atol=1e-3)
    # What it does follow: the per-token reverse KL of each next-token distribution, with the
    # prefix distribution held fixed (the full-vocabulary kl_alpha(alpha=1) loss, on-policy).
    one = torch.ones(1, 1, dtype=torch.float64)
    myopic = kl_alpha(theta1[None, None], teacher1[None, None], one, alpha=1.0)
    p1 = theta1.softmax(-1).detach()
    for y1 in range(V):
        myopic = myopic + p1[y1] * kl_alpha(theta2[y1][None, None], teacher2[y1][None, None], one, alpha=1.0)
    torch.testing.assert_close(grad_token, grad(myopic, params), rtol=1e-10, atol=1e-12)


def test_sd_to_go_leave_one_out_baseline_stays_unbiased(toy):
    """G = 2 iid samples, all 81 pairs enumerated: with the baseline the expected gradient of the
    group-mean loss is still exactly the reverse-KL gradient."""
    theta1, theta2, teacher1, teacher2 = toy
    params = [theta1, theta2]
    total = 0.0
    for pair in itertools.product(SEQUENCES, repeat=2):
        ls_BT = torch.cat([seq_logprobs(theta1, theta2, y) for y in pair])
        inputs = AdvantageInputs(
            rewards_B=torch.zeros(2, dtype=torch.float64),
            group_B=torch.zeros(2, dtype=torch.long),
            mask_BT=torch.ones(2, 2, dtype=torch.float64),
            student_logprobs_BT=ls_BT.detach(),
            teacher_logprobs_BT=torch.cat([seq_logprobs(teacher1, teacher2, y) for y in pair]),
        )
        advantages_BT = compute("sd_to_go", inputs, baseline=True)
        loss, _ = policy_loss(ls_BT, ls_BT.detach(), advantages_BT, inputs.mask_BT)
        total = total + ls_BT.sum().exp().detach() * loss * 4 / 2  # token-mean -> per-sample sum, / G
    torch.testing.assert_close(grad(total, params), grad(sequence_reverse_kl(*toy), params), rtol=1e-10, atol=1e-12)

"""The per-token objectives (agentopd.rl.objectives) against numbers worked out by hand, against float64
re-implementations of the reference formulas written here from their definitions (lasgroup/SDPO's
top-K + tail generalized JSD with the importance-ratio clip; TRL's sampled-token SDPO), and the
rollout correction, including cases where the clips bind."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from agentopd.rl import objectives
from agentopd.rl.logprobs import gather_logprobs
from agentopd.rl.losses import kl_alpha_per_token, kl_alpha_topk_per_token
from agentopd.rl.objectives import OBJECTIVES, TokenBatch, rollout_weights


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def algo(**kw):
    base = {"loss": "pg", "clip_low": 0.2, "clip_high": 0.28, "distill_weight": 0.0, "is_clip": 2.0, "trust_region": 0.0}
    return SimpleNamespace(**{**base, **kw})


def batch(lp, old, adv=None, token_w=None, teacher_w=None, rollout=None, **kw):
    zeros = torch.zeros_like(lp)
    return TokenBatch(lp, old, zeros if adv is None else adv, token_w if token_w is not None else zeros,
                      teacher_w if teacher_w is not None else zeros,
                      torch.ones_like(lp) if rollout is None else rollout, **kw)


def test_registry_and_what_each_objective_needs():
    assert set(OBJECTIVES) == {"pg", "sdpo", "sdpo_token", "mix", "opd"}
    assert objectives.needs(algo(loss="opd")) == {"divergence"}
    assert objectives.needs(algo(loss="pg")) == frozenset()
    assert objectives.needs(algo(loss="pg", distill_weight=0.5)) == {"divergence"}
    assert objectives.needs(algo(loss="sdpo")) == {"divergence"}
    assert objectives.needs(algo(loss="mix", distill_weight=0.5)) == {"divergence"}
    assert objectives.needs(algo(loss="sdpo_token")) == {"teacher_logprobs"}


def test_pg_by_hand_with_a_rollout_weight():
    # the numbers of test_losses.test_policy_loss_by_hand: old = 0, r = exp(lp), clip range [0.8, 1.28]
    ratio = t([[1.5, 0.5, 1.0], [1.1, 0.7, 2.0]])
    lp = ratio.log().requires_grad_()
    old = t([[0.0, 0.0, 0.0], [0.0, 0.0, -math.inf]])  # garbage under the mask must not leak
    mask = t([[1, 1, 1], [1, 1, 0]])
    b = batch(lp, old, adv=t([[2.0, -1.0, 2.0], [-2.0, 1.0, 5.0]]), token_w=mask / 5,
              rollout=t([[1.0, 1.0, 0.5], [2.0, 1.0, 1.0]]))
    loss, met = objectives.loss(algo(), b)
    # per-token -min(rA, clip(r)A) = [-2.56, .8, -2, 2.2, -.7], times the rollout weights [1, 1, .5, 2, 1]
    assert loss.item() == pytest.approx((-2.56 + 0.8 - 1.0 + 4.4 - 0.7) / 5, abs=1e-6)
    assert met["clipfrac"] == pytest.approx(2 / 5) and met["pg_loss"] == pytest.approx(loss.item())
    loss.backward()  # -r A w / 5 on the unclipped tokens
    torch.testing.assert_close(lp.grad, t([[0.0, 0.0, -1.0 / 5], [4.4 / 5, -0.7 / 5, 0.0]]))


# one position of V = 2: student [.5, .5], teacher [.75, .25]; the JSD (alpha .5) by hand
D_HAND = 0.5 * sum(p * math.log(p / m) for p, m in zip([0.75, 0.25], [0.625, 0.375])) + 0.5 * sum(
    p * math.log(p / m) for p, m in zip([0.5, 0.5], [0.625, 0.375]))  # = .0338221


def sdpo_case():
    """Three tokens: two with a teacher signal (importance ratio 3: the clip at 2 binds; ratio .5),
    one without (a sample with no teacher context)."""
    s_logits = torch.zeros(1, 3, 2, requires_grad=True)
    te_logits = t([[[math.log(3), 0.0]] * 3])
    div = kl_alpha_per_token(s_logits, te_logits, 0.5)
    lp = t([[math.log(3), math.log(0.5), 0.0]]).requires_grad_()
    teacher_w = t([[1, 1, 0]]) / 2
    return s_logits, lp, batch(lp, torch.zeros(1, 3), teacher_w=teacher_w, divergence_BT=div)


def test_sdpo_by_hand_the_importance_clip_binds_and_is_detached():
    s_logits, lp, b = sdpo_case()
    assert D_HAND == pytest.approx(0.0338221, abs=1e-7)
    loss, met = objectives.loss(algo(loss="sdpo"), b)
    assert loss.item() == pytest.approx((2.0 * D_HAND + 0.5 * D_HAND) / 2, abs=1e-7)  # min(3, 2) and .5
    assert met["is_mean"] == pytest.approx(1.25) and met["is_clipfrac"] == pytest.approx(0.5)
    assert met["distill_loss"] == pytest.approx(loss.item()) and "pg_loss" not in met  # no policy term
    g_lp, g_s = torch.autograd.grad(loss, [lp, s_logits], allow_unused=True)
    assert g_lp is None  # the ratio is a detached weight
    d_grad = torch.autograd.grad(kl_alpha_per_token(s_logits, t([[[math.log(3), 0.0]] * 3]), 0.5)[0, 0], s_logits)[0]
    torch.testing.assert_close(g_s[0, :2], torch.stack([d_grad[0, 0] * 2 / 2, d_grad[0, 0] * 0.5 / 2]))
    assert g_s[0, 2].abs().max() == 0  # the token without a teacher signal
    off, _ = objectives.loss(algo(loss="sdpo", is_clip=0.0), sdpo_case()[2])
    assert off.item() == pytest.approx(D_HAND, abs=1e-7)  # is_clip <= 0: no importance weight


def test_pg_with_distill_weight_adds_the_divergence_without_importance_weight():
    _, lp, b = sdpo_case()
    b.old_logprobs_BT = lp.detach()  # ratio 1 for the policy term
    b.token_weight_BT = t([[1, 1, 1]]) / 3
    b.advantages_BT = t([[1.0, -2.0, 3.0]])
    loss, met = objectives.loss(algo(distill_weight=2.0), b)
    assert met["pg_loss"] == pytest.approx(-(1 - 2 + 3) / 3, abs=1e-6)
    assert met["distill_loss"] == pytest.approx(2.0 * D_HAND, abs=1e-7)  # the old additive loss: no ratio
    assert loss.item() == pytest.approx(-2 / 3 + 2 * D_HAND, abs=1e-6)


def test_sdpo_token_by_hand():
    lp = t([[-1.0, -0.5, -3.0]]).requires_grad_()
    b = batch(lp, lp.detach(), teacher_w=t([[1, 1, 0]]) / 2, teacher_logprobs_BT=t([[-2.0, -0.5, 0.0]]))
    loss, met = objectives.loss(algo(loss="sdpo_token"), b)
    assert loss.item() == pytest.approx(((-1 + 2) * -1 + 0.0) / 2)  # (ls - lt) * ls
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(g, t([[1.0 / 2, 0.0, 0.0]]))  # (ls - lt): the policy gradient with A = lt - ls
    assert met["is_mean"] == pytest.approx(1.0)


def test_mix_by_hand():
    lp = t([[-1.0, -2.0]]).requires_grad_()
    b = batch(lp, lp.detach(), adv=t([[1.0, -2.0]]), token_w=t([[1, 1]]) / 2, teacher_w=t([[1, 1]]) / 2,
              divergence_BT=t([[0.2, 0.4]]))
    loss, met = objectives.loss(algo(loss="mix", distill_weight=0.25), b)
    # pg = mean(-A) = .5, sdpo = mean(divergence) = .3
    assert met["pg_loss"] == pytest.approx(0.75 * 0.5) and met["distill_loss"] == pytest.approx(0.25 * 0.3)
    assert loss.item() == pytest.approx(0.75 * 0.5 + 0.25 * 0.3)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_the_rollout_weight_multiplies_every_objective(name):
    gen = torch.Generator().manual_seed(0)
    lp = torch.randn(2, 3, generator=gen)
    b = batch(lp, lp - 0.1, adv=torch.randn(2, 3, generator=gen), token_w=torch.full((2, 3), 1 / 6),
              teacher_w=torch.full((2, 3), 1 / 6), teacher_logprobs_BT=torch.randn(2, 3, generator=gen),
              divergence_BT=torch.rand(2, 3, generator=gen))
    a = algo(loss=name, distill_weight=0.5, trust_region=0.3)
    one, _ = objectives.loss(a, b)
    b.rollout_weight_BT = torch.full((2, 3), 0.5)
    half, _ = objectives.loss(a, b)
    assert one.abs() > 1e-3 and half.item() == pytest.approx(0.5 * one.item(), rel=1e-6)


def test_rollout_weights_clip_and_metrics():
    old = t([[0.0, 0.0, 0.0, 0.0]])
    engine = t([[-math.log(3), math.log(2), 0.0, 5.0]])
    have = t([[1, 1, 1, 0]])  # the last token has no engine log-prob
    w, met = rollout_weights(old, engine, have, clip=2.0)
    torch.testing.assert_close(w, t([[2.0, 0.5, 1.0, 1.0]]))  # min(3, 2) binds
    assert met["rollout_logprob_diff"] == pytest.approx((math.log(3) + math.log(2)) / 3, abs=1e-6)
    assert met["rollout_is_mean"] == pytest.approx(3.5 / 3) and met["rollout_is_clipfrac"] == pytest.approx(1 / 3)
    w, met = rollout_weights(old, engine, have, clip=0.0)  # off: weight 1, the mismatch still measured
    assert torch.equal(w, torch.ones(1, 4)) and met["rollout_is_clipfrac"] == 0.0
    assert met["rollout_logprob_diff"] == pytest.approx((math.log(3) + math.log(2)) / 3, abs=1e-6)
    w, _ = rollout_weights(old, t([[-50.0, 0.0, 0.0, 0.0]]), have, clip=1e12)  # log-ratio bounded at 20
    assert w[0, 0].item() == pytest.approx(math.exp(20.0), rel=1e-5)


# ---------------------------------------------------------------- the references' formulas, float64


def lasgroup_sdpo_reference(s_logits, te_logits, ids, old, resp_mask, sd_mask, alpha, k, is_clip, temp):
    """lasgroup/SDPO's loss_mode=sdpo from its definition: logits over the temperature; the student's
    top-k log-probs and the teacher's at the same ids, each with a tail bucket log(1 - sum p) (the
    captured log-mass capped at -1e-7); the generalized JSD alpha KL(t || m) + (1 - alpha) KL(s || m),
    m = (1 - alpha) s + alpha t; times min(exp(clamp(ls - ls_old, +-20)), is_clip), detached; the mean
    over the response tokens of samples with a teacher signal."""
    s_all, te_all = F.log_softmax(s_logits / temp, -1), F.log_softmax(te_logits / temp, -1)
    top = s_all.topk(k, -1).indices

    def with_tail(x):
        mass = torch.logsumexp(x, -1, keepdim=True).clamp(max=-1e-7)
        return torch.cat([x, torch.log(-torch.expm1(mass))], -1)

    s, te = with_tail(s_all.gather(-1, top)), with_tail(te_all.gather(-1, top))
    m = torch.log((1 - alpha) * s.exp() + alpha * te.exp())
    jsd = alpha * (te.exp() * (te - m)).sum(-1) + (1 - alpha) * (s.exp() * (s - m)).sum(-1)
    ls = s_all.gather(-1, ids[..., None]).squeeze(-1)
    ratio = torch.exp((ls - old).detach().clamp(-20, 20)).clamp(max=is_clip)
    mask = resp_mask * sd_mask[:, None]
    return (jsd * ratio * mask).sum() / mask.sum()


def trl_sampled_token_reference(s_logits, te_logits, ids, old, mask, is_clip, temp):
    """TRL's SDPOTrainer, distillation_mode=sampled_token (alpha 1): logits over the temperature; per
    token (ls - lt).detach() * ls, times min(exp(clamp(ls - ls_old, +-20)), is_clip) (detached); each
    sequence's token mean, then the mean over sequences."""
    ls = F.log_softmax(s_logits / temp, -1).gather(-1, ids[..., None]).squeeze(-1)
    lt = F.log_softmax(te_logits / temp, -1).gather(-1, ids[..., None]).squeeze(-1)
    per = (ls - lt).detach() * ls * torch.exp((ls - old).detach().clamp(-20, 20)).clamp(max=is_clip)
    return ((per * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def reference_case(seed=0, B=3, T=5, V=13):
    gen = torch.Generator().manual_seed(seed)
    s_logits = (2 * torch.randn(B, T, V, generator=gen, dtype=torch.float64)).requires_grad_()
    te_logits = 2 * torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=gen)
    shift = 1.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)  # ls - ls_old: the clip at 2 binds somewhere
    return s_logits, te_logits, ids, shift


@pytest.mark.parametrize("alpha, k, temp", [(0.5, 4, 1.0), (0.5, 4, 0.7), (0.25, 12, 1.3), (0.5, 13, 1.0)])
def test_sdpo_matches_lasgroup_formula_float64(alpha, k, temp):
    s_logits, te_logits, ids, shift = reference_case()
    resp_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float64)
    sd_mask = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)  # the last sample has no teacher context
    lp = torch.stack(gather_logprobs(s_logits, ids.tolist(), temp))  # the learner's gather, float64 kept
    old = (lp - shift).detach()
    tm = resp_mask * sd_mask[:, None]
    assert ((lp - old).exp()[tm.bool()] > 2).any()  # the clip binds
    ref = lasgroup_sdpo_reference(s_logits, te_logits, ids, old, resp_mask, sd_mask, alpha, k, 2.0, temp)
    b = batch(lp, old, token_w=resp_mask / resp_mask.sum(), teacher_w=tm / tm.sum(),
              divergence_BT=kl_alpha_topk_per_token(s_logits, te_logits, alpha, k, temp))
    got, _ = objectives.loss(algo(loss="sdpo"), b)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, s_logits)[0], torch.autograd.grad(ref, s_logits)[0],
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temp", [1.0, 0.6])
def test_sdpo_token_matches_trl_formula_float64(temp):
    # equal-length sequences: TRL's per-sequence token mean then equals the batch token mean
    s_logits, te_logits, ids, shift = reference_case(seed=1)
    mask = torch.ones(3, 5, dtype=torch.float64)
    ls = F.log_softmax(s_logits / temp, -1).gather(-1, ids[..., None]).squeeze(-1)
    lt = F.log_softmax(te_logits / temp, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = (ls - shift).detach()
    assert ((ls - old).exp() > 2).any()  # the clip binds
    ref = trl_sampled_token_reference(s_logits, te_logits, ids, old, mask, 2.0, temp)
    b = batch(ls, old, teacher_w=mask / mask.sum(), teacher_logprobs_BT=lt.detach())
    got, _ = objectives.loss(algo(loss="sdpo_token"), b)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, s_logits)[0], torch.autograd.grad(ref, s_logits)[0],
                               rtol=1e-9, atol=1e-12)


def test_opd_equals_the_formula_in_float64():
    """OPD (gamma = 0): sum over the teacher-signal tokens of min(pi_theta/pi_old, clip) (detached) x the
    reverse KL of the student's next-token distribution to the teacher's, plus beta x the k3 estimate
    r - 1 - log r of KL(pi_old || pi_theta) at the sampled token, each token weighted; written here from
    the definition with explicit sums, against objectives.opd on the same tensors (value and gradient)."""
    g = torch.Generator().manual_seed(3)
    B, T, V, beta, clip = 2, 4, 7, 0.3, 1.5
    s_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    te_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    y = torch.randint(V, (B, T), generator=g)
    lp = s_logits.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
    old = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).detach()  # some ratios above the clip
    w = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float64) / 4
    b = batch(lp, old, teacher_w=w, divergence_BT=kl_alpha_per_token(s_logits, te_logits, 1.0))
    loss, met = objectives.loss(algo(loss="opd", trust_region=beta, is_clip=clip), b)
    (grad,) = torch.autograd.grad(loss, s_logits)

    expect = torch.zeros((), dtype=torch.float64)
    for i in range(B):
        for k in range(T):
            if w[i, k] == 0:
                continue
            p = s_logits[i, k].softmax(-1)
            q = te_logits[i, k].softmax(-1)
            reverse_kl = sum(p[v] * (p[v].log() - q[v].log()) for v in range(V))
            r = (p[y[i, k]].log() - old[i, k]).exp()
            expect = expect + w[i, k] * (min(float(r.detach()), clip) * reverse_kl + beta * (r - 1 - r.log()))
    (expect_grad,) = torch.autograd.grad(expect, s_logits)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-10)
    torch.testing.assert_close(grad, expect_grad, rtol=1e-9, atol=1e-12)
    assert met["trust_loss"] > 0 and met["distill_loss"] > 0
    assert 0 < met["is_clipfrac"] < float(w.sum())  # the clip binds on some tokens, not all


@pytest.mark.parametrize("loss, advantage, distill_weight, reads", [
    ("pg", "grpo", 0.0, False), ("pg", "rloo", 0.0, False), ("pg", "sd_token", 0.0, True),
    ("pg", "hybrid", 0.0, True), ("pg", "grpo", 0.5, True), ("sdpo", "grpo", 0.0, True),
    ("sdpo_token", "grpo", 0.0, True), ("opd", "grpo", 0.0, True), ("mix", "grpo", 0.5, True),
])
def test_the_algorithm_declares_whether_it_reads_a_teacher(loss, advantage, distill_weight, reads):
    assert objectives.needs_teacher(algo(loss=loss, advantage=advantage, distill_weight=distill_weight)) is reads

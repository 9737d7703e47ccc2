"""Losses against numbers worked out by hand; top-K and chunked KL against the full KL; chunked
top-K (the student's or the teacher's) against the unchunked forms; chunked token log-probs against
gathered full ones; and memory checks (tensor sizes, not timings) for the chunked KL and log-probs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from agentopd.rl import losses
from agentopd.rl.losses import (
    entropy_from_logits,
    kl_alpha,
    kl_alpha_chunked,
    kl_alpha_per_token,
    kl_alpha_teacher_topk_chunked_per_token,
    kl_alpha_teacher_topk_per_token,
    kl_alpha_topk,
    kl_alpha_topk_chunked_per_token,
    kl_alpha_topk_per_token,
    policy_loss,
    ref_kl_k3,
    token_logprobs_chunked,
)


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


# ---------------------------------------------------------------- policy terms


def test_policy_loss_by_hand():
    # old = 0, so r = exp(lp). Clip range [0.8, 1.28].
    ratio_BT = t([[1.5, 0.5, 1.0], [1.1, 0.7, 2.0]])
    advantages_BT = t([[2.0, -1.0, 2.0], [-2.0, 1.0, 5.0]])
    mask_BT = t([[1, 1, 1], [1, 1, 0]])
    logprobs_BT = ratio_BT.log().requires_grad_()
    old_BT = t([[0.0, 0.0, 0.0], [0.0, 0.0, -math.inf]])  # garbage under the mask must not leak
    loss, metrics = policy_loss(logprobs_BT, old_BT, advantages_BT, mask_BT)
    # per-token min(rA, clip(r)A):
    #   (0,0) r=1.5 A=2  -> min(3, 2.56)   = 2.56    clipped
    #   (0,1) r=.5  A=-1 -> min(-.5, -.8)  = -.8     clipped
    #   (0,2) r=1   A=2  -> 2
    #   (1,0) r=1.1 A=-2 -> -2.2
    #   (1,1) r=.7  A=1  -> min(.7, .8)    = .7
    assert loss.item() == pytest.approx(-(2.56 - 0.8 + 2.0 - 2.2 + 0.7) / 5, abs=1e-6)
    assert metrics["clip_frac"] == pytest.approx(2 / 5)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.0 + 1.1 + 0.7) / 5, abs=1e-6)
    loss.backward()
    # d/dlp of -rA/5 on unclipped tokens, 0 on clipped and masked ones
    expected = t([[0.0, 0.0, -2.0 / 5], [2.2 / 5, -0.7 / 5, 0.0]])
    torch.testing.assert_close(logprobs_BT.grad, expected)


def test_ref_kl_k3_by_hand():
    logprobs_BT = t([[-1.0, -2.0, 0.0]]).requires_grad_()
    ref_BT = t([[-1.0, -1.0, -0.5]])
    mask_BT = t([[1, 1, 0]])
    # d = ref - lp = [0, 1, (masked)];  k3 = e^d - d - 1 = [0, e - 2]
    loss = ref_kl_k3(logprobs_BT, ref_BT, mask_BT)
    assert loss.item() == pytest.approx((math.e - 2) / 2, abs=1e-6)
    loss.backward()  # d k3 / d lp = 1 - e^d
    torch.testing.assert_close(logprobs_BT.grad, t([[0.0, (1 - math.e) / 2, 0.0]]))


def test_entropy_by_hand():
    logits_BTV = t([[[0.0, 0.0], [math.log(3), 0.0], [5.0, -5.0]]])
    mask_BT = t([[1, 1, 0]])
    h_uniform = math.log(2)
    h_3to1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert entropy_from_logits(logits_BTV, mask_BT).item() == pytest.approx((h_uniform + h_3to1) / 2, abs=1e-6)


# ---------------------------------------------------------------- distillation divergences
# One position, V = 2: student s = [.5, .5], teacher q = [.75, .25].
S_LOGITS = t([[[0.0, 0.0]]])
T_LOGITS = t([[[math.log(3), 0.0]]])
ONE = t([[1]])


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (0.0, 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)),  # KL(t || s) = .130812
        (1.0, 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)),  # KL(s || t) = .143841
        # m = .5 t + .5 s = [.625, .375]
        (0.5, 0.5 * kl([0.75, 0.25], [0.625, 0.375]) + 0.5 * kl([0.5, 0.5], [0.625, 0.375])),
        # m = .25 t + .75 s = [.5625, .4375]: asymmetric, pins which side alpha weighs
        (0.25, 0.25 * kl([0.75, 0.25], [0.5625, 0.4375]) + 0.75 * kl([0.5, 0.5], [0.5625, 0.4375])),
    ],
)
def test_kl_alpha_by_hand(alpha, expected):
    assert kl_alpha(S_LOGITS, T_LOGITS, ONE, alpha).item() == pytest.approx(expected, abs=1e-6)


def test_kl_alpha_hand_values_spelled_out():
    assert kl_alpha(S_LOGITS, T_LOGITS, ONE, 0.0).item() == pytest.approx(0.1308120, abs=1e-6)
    assert kl_alpha(S_LOGITS, T_LOGITS, ONE, 1.0).item() == pytest.approx(0.1438410, abs=1e-6)
    assert kl_alpha(S_LOGITS, T_LOGITS, ONE, 0.5).item() == pytest.approx(0.0338221, abs=1e-6)
    assert kl_alpha(S_LOGITS, T_LOGITS, ONE, 0.25).item() == pytest.approx(0.0248700, abs=1e-6)


def trl_style_generalized_jsd(student_logits, teacher_logits, beta):
    """TRL's GKD formula written with F.kl_div (kl_div(input, target) = KL(target || input))."""
    s, te = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    if beta == 0:
        return F.kl_div(s, te, reduction="none", log_target=True).sum(-1).mean()
    if beta == 1:
        return F.kl_div(te, s, reduction="none", log_target=True).sum(-1).mean()
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), te + math.log(beta)]), 0)
    jsd = beta * F.kl_div(m, te, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
        m, s, reduction="none", log_target=True
    )
    return jsd.sum(-1).mean()


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_kl_alpha_matches_trl_convention(alpha):
    gen = torch.Generator().manual_seed(1)
    s, te = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
    torch.testing.assert_close(kl_alpha(s, te, torch.ones(2, 3), alpha), trl_style_generalized_jsd(s, te, alpha))


def test_kl_alpha_masks_and_rejects_bad_alpha():
    s = torch.cat([S_LOGITS, t([[[9.0, -9.0]]])], 1)
    te = torch.cat([T_LOGITS, t([[[0.0, 0.0]]])], 1)
    assert kl_alpha(s, te, t([[1, 0]]), 1.0).item() == pytest.approx(0.1438410, abs=1e-6)
    with pytest.raises(ValueError):
        kl_alpha(s, te, t([[1, 0]]), 1.5)


# ---------------------------------------------------------------- top-K


def test_kl_topk_by_hand():
    # s = [.5, .3, .2], q = [.2, .2, .6]; K = 1 keeps the student's top token 0 plus a tail.
    s = t([[[0.5, 0.3, 0.2]]]).log()
    q = t([[[0.2, 0.2, 0.6]]]).log()
    assert kl_alpha_topk(s, q, ONE, 1.0, k=1).item() == pytest.approx(
        0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8), abs=1e-6
    )  # .2231436
    assert kl_alpha_topk(s, q, ONE, 0.0, k=1).item() == pytest.approx(
        0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.5), abs=1e-6
    )  # .1927448
    # K = 2: the tail is the single remaining token, so it is the full KL
    for alpha in (0.0, 0.5, 1.0):
        torch.testing.assert_close(kl_alpha_topk(s, q, ONE, alpha, k=2), kl_alpha(s, q, ONE, alpha))


def test_kl_topk_uses_the_students_top_tokens():
    # Teacher's top token (2) is the student's least likely: K=1 must keep token 0, not 2.
    s = t([[[0.5, 0.3, 0.2]]]).log()
    q = t([[[0.1, 0.1, 0.8]]]).log()
    expected = 0.5 * math.log(0.5 / 0.1) + 0.5 * math.log(0.5 / 0.9)
    assert kl_alpha_topk(s, q, ONE, 1.0, k=1).item() == pytest.approx(expected, abs=1e-6)


def test_teacher_topk_by_hand_uses_the_teachers_top_tokens():
    # s = [.5, .3, .2], q = [.1, .2, .7]: the teacher's top token is 2, the student's least likely.
    # K = 1 over the teacher's support: {2, tail}, student [.2, .8], teacher [.7, .3].
    s = t([[[0.5, 0.3, 0.2]]]).log()
    ids, lps = torch.tensor([[[2]]]), t([[[0.7]]]).log()
    got = kl_alpha_teacher_topk_per_token(s, ids, lps, 1.0)
    assert got.item() == pytest.approx(0.2 * math.log(0.2 / 0.7) + 0.8 * math.log(0.8 / 0.3), abs=1e-6)  # .5341108
    got = kl_alpha_teacher_topk_per_token(s, ids, lps, 0.0)
    assert got.item() == pytest.approx(0.7 * math.log(0.7 / 0.2) + 0.3 * math.log(0.3 / 0.8), abs=1e-6)  # .5826852
    # K = 2 (tokens 2, 1): the tail is token 0 on both sides, so it is the full KL
    ids, lps = torch.tensor([[[2, 1]]]), t([[[0.7, 0.2]]]).log()
    q = t([[[0.1, 0.2, 0.7]]]).log()
    for alpha in (0.0, 0.5, 1.0):
        torch.testing.assert_close(kl_alpha_teacher_topk_per_token(s, ids, lps, alpha), kl_alpha_per_token(s, q, alpha))


def teacher_topk_of(teacher_logits, k):
    """A teacher server's answer: its top-k ids and their (full-vocabulary) log-probs."""
    lps, ids = F.log_softmax(teacher_logits, -1).topk(k, -1)
    return ids, lps


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_teacher_topk_with_k_equal_v_is_full_kl(alpha):
    gen = torch.Generator().manual_seed(6)
    s = (2 * torch.randn(2, 4, 11, generator=gen, dtype=torch.float64)).requires_grad_()
    te = 2 * torch.randn(2, 4, 11, generator=gen, dtype=torch.float64)
    ids, lps = teacher_topk_of(te, 11)
    got = kl_alpha_teacher_topk_per_token(s, ids, lps, alpha)
    want = kl_alpha_per_token(s, te, alpha)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), s)[0], torch.autograd.grad(want.sum(), s)[0],
                               atol=1e-6, rtol=0)
    # K < V is not the full KL: the check above can tell them apart
    assert not torch.allclose(kl_alpha_teacher_topk_per_token(s, *teacher_topk_of(te, 3), alpha), want, atol=1e-3)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_kl_topk_with_k_equal_v_is_full_kl(alpha):
    gen = torch.Generator().manual_seed(2)
    s = (2 * torch.randn(2, 4, 11, generator=gen)).requires_grad_()
    te = 2 * torch.randn(2, 4, 11, generator=gen)
    mask = t([[1, 1, 1, 0], [1, 0, 1, 1]])
    top = kl_alpha_topk(s, te, mask, alpha, k=11)
    (grad_top,) = torch.autograd.grad(top, s)
    full = kl_alpha(s, te, mask, alpha)
    (grad_full,) = torch.autograd.grad(full, s)
    torch.testing.assert_close(top, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_top, grad_full, atol=1e-5, rtol=1e-5)


def test_kl_topk_is_finite_when_the_student_is_peaked():
    s = t([[[60.0, -60.0, -60.0]]]).requires_grad_()
    q = t([[[0.0, 0.0, 0.0]]])
    loss = kl_alpha_topk(s, q, ONE, 0.5, k=1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- chunked


def chunked_setup(seed=3, B=2, T=6, H=4, V=64, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=dtype, requires_grad=True)
    teacher_hidden = torch.randn(B, T, H, generator=gen, dtype=dtype)
    weight = torch.randn(V, H, generator=gen, dtype=dtype, requires_grad=True)
    mask = t([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    return hidden, teacher_hidden, weight, mask


def unchunked(hidden, teacher_hidden, weight, mask, alpha, teacher_weight=None):
    teacher_weight = weight.detach() if teacher_weight is None else teacher_weight
    return kl_alpha(hidden @ weight.T, (teacher_hidden @ teacher_weight.T).detach(), mask, alpha)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 100])
def test_chunked_equals_unchunked_value_and_gradient(alpha, chunk):
    hidden, teacher_hidden, weight, mask = chunked_setup()
    teacher_hidden.requires_grad_()  # must get no gradient
    ref = unchunked(hidden, teacher_hidden, weight, mask, alpha)
    ref_grads = torch.autograd.grad(ref, [hidden, weight])
    got = kl_alpha_chunked(hidden, teacher_hidden, weight, mask, alpha, chunk=chunk)
    got_grads = torch.autograd.grad(got, [hidden, weight])
    torch.testing.assert_close(got, ref)
    for g, r in zip(got_grads, ref_grads):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, r)
    got2 = kl_alpha_chunked(hidden, teacher_hidden, weight, mask, alpha, chunk=chunk)
    got2.backward()
    assert teacher_hidden.grad is None


def test_chunked_with_a_separate_teacher_head():
    hidden, teacher_hidden, weight, mask = chunked_setup()
    teacher_weight = torch.randn(64, 4, generator=torch.Generator().manual_seed(4), requires_grad=True)
    ref = unchunked(hidden, teacher_hidden, weight, mask, 0.5, teacher_weight=teacher_weight.detach())
    got = kl_alpha_chunked(hidden, teacher_hidden, weight, mask, 0.5, chunk=5, teacher_lm_head_weight_VH=teacher_weight)
    torch.testing.assert_close(got, ref)
    got.backward()
    assert teacher_weight.grad is None and weight.grad is not None


def test_chunked_bf16_inputs_use_float32_math():
    hidden, teacher_hidden, weight, mask = chunked_setup()
    got = kl_alpha_chunked(hidden.bfloat16(), teacher_hidden.bfloat16(), weight.bfloat16(), mask, 1.0, chunk=4)
    ref = unchunked(hidden.bfloat16().float(), teacher_hidden.bfloat16().float(), weight.bfloat16().float(), mask, 1.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


# ---------------------------------------------------------------- chunked top-K


def assert_close_1e6(got, want):
    torch.testing.assert_close(got.to(want.dtype), want, atol=1e-6, rtol=0)


def assert_same_grads(got, want, inputs):
    for g, w in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), inputs)):
        assert w.abs().max() > 1e-3
        assert_close_1e6(g, w)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk", [1, 3, 4, 100])  # 10 masked positions: 3 and 4 leave a short last chunk
def test_topk_chunked_equals_unchunked_value_and_gradient(alpha, chunk):
    hidden, teacher_hidden, weight, mask = chunked_setup(dtype=torch.float64)
    teacher_hidden.requires_grad_()  # must get no gradient
    want_BT = kl_alpha_topk_per_token(hidden @ weight.T, teacher_hidden @ weight.T, alpha, k=5) * mask
    got_BT = kl_alpha_topk_chunked_per_token(hidden, teacher_hidden, weight, mask, alpha, k=5, chunk=chunk)
    assert got_BT.dtype == torch.float32 and (got_BT[mask.bool()] > 1e-3).all()
    assert_close_1e6(got_BT, want_BT)
    full_BT = kl_alpha_per_token(hidden @ weight.T, teacher_hidden @ weight.T, alpha) * mask
    assert not torch.allclose(want_BT, full_BT, atol=1e-3)  # 5 of 64 tokens + a tail is not the full KL
    assert_same_grads(got_BT, want_BT, [hidden, weight])
    kl_alpha_topk_chunked_per_token(hidden, teacher_hidden, weight, mask, alpha, k=5, chunk=chunk).sum().backward()
    assert teacher_hidden.grad is None and weight.grad is not None


def test_topk_chunked_with_a_separate_teacher_head_and_a_temperature():
    hidden, _, weight, mask = chunked_setup(dtype=torch.float64)
    gen = torch.Generator().manual_seed(8)
    teacher_hidden = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)  # a teacher of another hidden size
    teacher_weight = torch.randn(64, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    want_BT = kl_alpha_topk_per_token(hidden @ weight.T, teacher_hidden @ teacher_weight.T, 0.5, 5, temperature=0.7)
    got_BT = kl_alpha_topk_chunked_per_token(hidden, teacher_hidden, weight, mask, 0.5, 5, chunk=4,
                                             teacher_lm_head_weight_VH=teacher_weight, temperature=0.7)
    assert_close_1e6(got_BT, want_BT * mask)
    untempered_BT = kl_alpha_topk_chunked_per_token(hidden, teacher_hidden, weight, mask, 0.5, 5, chunk=4,
                                                    teacher_lm_head_weight_VH=teacher_weight)
    assert not torch.allclose(got_BT, untempered_BT, atol=1e-3)
    got_BT.sum().backward()
    assert teacher_weight.grad is None and weight.grad is not None


def padded_teacher_topk(teacher_logits_BTV, mask_BT, k):
    """The teacher's top-k ids and log-probs, and the same with a server's padding outside
    ``mask_BT`` (id 0, log-prob -inf); the padded log-probs a leaf that asks for a gradient."""
    with torch.no_grad():
        ids_BTK, lps_BTK = teacher_topk_of(teacher_logits_BTV, k)
    pad_BT1 = ~mask_BT.bool()[..., None]
    padded_lps_BTK = lps_BTK.masked_fill(pad_BT1, -math.inf).requires_grad_()
    return ids_BTK, lps_BTK, ids_BTK.masked_fill(pad_BT1, 0), padded_lps_BTK


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk", [1, 3, 4, 100])
def test_teacher_topk_chunked_equals_unchunked_value_and_gradient(alpha, chunk):
    hidden, teacher_hidden, weight, mask = chunked_setup(dtype=torch.float64)
    ids_BTK, lps_BTK, padded_ids_BTK, padded_lps_BTK = padded_teacher_topk(teacher_hidden @ weight.T, mask, 5)
    want_BT = kl_alpha_teacher_topk_per_token(hidden @ weight.T, ids_BTK, lps_BTK, alpha) * mask
    got_BT = kl_alpha_teacher_topk_chunked_per_token(hidden, weight, padded_ids_BTK, padded_lps_BTK, mask, alpha,
                                                     chunk=chunk)
    assert got_BT.dtype == torch.float32 and (got_BT[mask.bool()] > 1e-3).all()
    assert_close_1e6(got_BT, want_BT)  # the padding is never read: no nan, no inf
    assert_same_grads(got_BT, want_BT, [hidden, weight])
    kl_alpha_teacher_topk_chunked_per_token(hidden, weight, padded_ids_BTK, padded_lps_BTK, mask, alpha,
                                            chunk=chunk).sum().backward()
    assert padded_lps_BTK.grad is None and torch.isfinite(hidden.grad).all()


def test_teacher_topk_temperature_divides_the_student_only():
    hidden, teacher_hidden, weight, mask = chunked_setup(dtype=torch.float64)
    ids_BTK, lps_BTK, _, _ = padded_teacher_topk(teacher_hidden @ weight.T, mask, 5)
    logits_BTV = hidden @ weight.T
    want_BT = kl_alpha_teacher_topk_per_token(logits_BTV / 0.7, ids_BTK, lps_BTK, 0.5)
    assert_close_1e6(kl_alpha_teacher_topk_per_token(logits_BTV, ids_BTK, lps_BTK, 0.5, temperature=0.7), want_BT)
    got_BT = kl_alpha_teacher_topk_chunked_per_token(hidden, weight, ids_BTK, lps_BTK, mask, 0.5, chunk=4,
                                                     temperature=0.7)
    assert_close_1e6(got_BT, want_BT * mask)
    assert not torch.allclose(want_BT, kl_alpha_teacher_topk_per_token(logits_BTV, ids_BTK, lps_BTK, 0.5), atol=1e-3)
    assert_same_grads(got_BT, want_BT * mask, [hidden, weight])


def test_topk_chunked_with_nothing_masked_in_is_zero_and_backpropagates():
    hidden, teacher_hidden, weight, mask = chunked_setup()
    ids_BTK, lps_BTK, _, _ = padded_teacher_topk(teacher_hidden @ weight.T, mask, 5)
    none_BT = torch.zeros_like(mask)
    for got_BT in (kl_alpha_topk_chunked_per_token(hidden, teacher_hidden, weight, none_BT, 0.5, 5),
                   kl_alpha_teacher_topk_chunked_per_token(hidden, weight, ids_BTK, lps_BTK, none_BT, 0.5)):
        assert torch.equal(got_BT, torch.zeros(2, 6))
        (grad,) = torch.autograd.grad(got_BT.sum(), hidden)
        assert torch.equal(grad, torch.zeros_like(hidden))
    with pytest.raises(ValueError):
        kl_alpha_teacher_topk_chunked_per_token(hidden, weight, ids_BTK, lps_BTK, none_BT, 1.5)
    with pytest.raises(ValueError):
        kl_alpha_topk_chunked_per_token(hidden, teacher_hidden, weight, none_BT, -0.1, 5)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward, recomputation and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def memory_footprint(fn, inputs):
    """(elements in the distinct new storages autograd holds for backward at the end of fn()'s
    forward, not counting the inputs' own storage; largest tensor any op produces during fn() and
    its backward)."""
    existing = {x.untyped_storage().data_ptr() for x in inputs}
    saved = {}

    def pack(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in existing:
            saved[storage.data_ptr()] = storage.nbytes() // x.element_size()
        return x

    with LargestTensor() as produced:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = fn()
        loss.backward()
    return sum(saved.values()), produced.largest


def chunked_kl(kind, hidden, teacher_hidden, weight, mask, chunk=3):
    """A function of no arguments: a token-mean loss from one of the chunked divergences (``kind``:
    kl, topk, teacher_topk); the teacher's top-K (for teacher_topk) is taken here, not in it."""
    with torch.no_grad():
        ids_BTK, lps_BTK = teacher_topk_of(teacher_hidden @ weight.T, 5)

    def loss():
        if kind == "kl":
            return kl_alpha_chunked(hidden, teacher_hidden, weight, mask, 0.5, chunk=chunk)
        if kind == "topk":
            per_token_BT = kl_alpha_topk_chunked_per_token(hidden, teacher_hidden, weight, mask, 0.5, 5, chunk=chunk)
        else:
            per_token_BT = kl_alpha_teacher_topk_chunked_per_token(hidden, weight, ids_BTK, lps_BTK, mask, 0.5, chunk)
        return per_token_BT.sum() / mask.sum()

    return loss


@pytest.mark.parametrize("kind", ["kl", "topk", "teacher_topk"])
def test_chunked_never_holds_a_full_BTV_tensor(monkeypatch, kind):
    B, T, H, V = 2, 6, 4, 64
    hidden, teacher_hidden, weight, mask = chunked_setup(B=B, T=T, H=H, V=V)
    full = B * T * V

    chunked = chunked_kl(kind, hidden, teacher_hidden, weight, mask)

    inputs = (hidden, teacher_hidden, weight, mask)
    saved, produced = memory_footprint(lambda: unchunked(hidden, teacher_hidden, weight, mask, 0.5), inputs)
    assert saved >= full and produced >= full  # the checks do see a [B, T, V] tensor when there is one

    saved, produced = memory_footprint(chunked, inputs)
    assert saved < full and produced < full
    assert produced <= max(3 * V, V * H)  # a chunk of logits, or the lm_head weight's gradient

    # Without the checkpointing, every chunk's logits would stay saved until backward.
    monkeypatch.setattr(losses, "checkpoint", lambda fn, *args, use_reentrant: fn(*args))
    saved, _ = memory_footprint(chunked, inputs)
    assert saved >= mask.sum() * V


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_chunked_token_logprobs_equal_gathered_full_logprobs(chunk):
    hidden, _, weight, _ = chunked_setup()
    hidden_NH = hidden.reshape(-1, 4)
    target_N = torch.arange(hidden_NH.shape[0]) * 5 % 64
    logp_NV = F.log_softmax(hidden_NH @ weight.T, -1)
    ref_N = logp_NV.gather(-1, target_N[:, None]).squeeze(-1)
    ref_grads = torch.autograd.grad(ref_N.sum(), [hidden, weight])
    got_N, top = token_logprobs_chunked(hidden_NH, weight, target_N, chunk=chunk)
    assert top is None
    torch.testing.assert_close(got_N, ref_N)
    for g, r in zip(torch.autograd.grad(got_N.sum(), [hidden, weight]), ref_grads):
        torch.testing.assert_close(g, r)
    with torch.no_grad():
        _, (values_NK, indices_NK) = token_logprobs_chunked(hidden_NH, weight, target_N, chunk=chunk, topk=3)
    ref_values, ref_indices = logp_NV.topk(3, -1)
    torch.testing.assert_close(values_NK, ref_values)
    assert torch.equal(indices_NK, ref_indices)
    empty_N, _ = token_logprobs_chunked(hidden_NH[:0], weight, target_N[:0], chunk=chunk)
    assert empty_N.shape == (0,)


def test_chunked_token_logprobs_never_hold_an_NV_tensor():
    B, T, H, V = 2, 6, 4, 64
    hidden, _, weight, _ = chunked_setup(B=B, T=T, H=H, V=V)
    target_N = torch.arange(B * T) % V
    saved, produced = memory_footprint(
        lambda: token_logprobs_chunked(hidden.reshape(-1, H), weight, target_N, chunk=3)[0].sum(), (hidden, weight))
    assert saved < B * T * V and produced <= max(3 * V, V * H)


class HeadOps(TorchDispatchMode):
    """Output dtypes of the matmuls whose result ends in the vocabulary dimension and of the
    log-softmaxes; how many [V, H] copies are made."""

    def __init__(self, V, H):
        super().__init__()
        self.V, self.H, self.products, self.log_softmax, self.head_copies = V, H, set(), set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm") and out.shape[-1] == self.V:
            self.products.add(out.dtype)
        elif name == "_log_softmax":
            self.log_softmax.add(out.dtype)
        elif name == "_to_copy" and tuple(out.shape) == (self.V, self.H):
            self.head_copies += 1
        return out


@pytest.mark.parametrize("kind", ["logprobs", "kl", "topk", "teacher_topk"])
def test_chunked_head_product_runs_in_the_autocast_dtype_with_float32_log_softmax(kind):
    B, T, H, V = 2, 6, 4, 64
    hidden, teacher_hidden, weight, mask = chunked_setup(B=B, T=T, H=H, V=V)
    target_N = torch.arange(B * T) % V

    def run():
        return token_logprobs_chunked(hidden.reshape(-1, H), weight, target_N, chunk=3)[0].sum()

    if kind != "logprobs":
        run = chunked_kl(kind, hidden, teacher_hidden, weight, mask)

    ref = run()
    with HeadOps(V, H) as fp32:
        run()
    assert fp32.products == {torch.float32} and fp32.head_copies == 0  # no autocast: float32 as before
    with HeadOps(V, H) as ops, torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
    assert ops.products == {torch.bfloat16} and ops.log_softmax == {torch.float32}
    assert ops.head_copies == (2 if kind in ("kl", "topk") else 1)  # the head cast once (per side), not per chunk
    assert got.dtype == torch.float32 and got != ref
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)
    got.backward()
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()


# ---------------------------------------------------------------- sampling temperature


@pytest.mark.parametrize("temp", [0.7, 1.6])
def test_chunked_logprobs_and_divergence_at_a_temperature(temp):
    hidden, teacher_hidden, weight, mask = chunked_setup()
    hidden_NH, target_N = hidden.reshape(-1, 4), torch.arange(12) * 5 % 64
    want_N = F.log_softmax(hidden_NH @ weight.T / temp, -1).gather(-1, target_N[:, None]).squeeze(-1)
    got_N, (top_vals, _) = token_logprobs_chunked(hidden_NH, weight, target_N, chunk=5, topk=3, temperature=temp)
    torch.testing.assert_close(got_N, want_N)
    torch.testing.assert_close(top_vals, F.log_softmax(hidden_NH @ weight.T / temp, -1).topk(3, -1).values)
    assert not torch.allclose(got_N, token_logprobs_chunked(hidden_NH, weight, target_N, chunk=5)[0])
    s_logp = F.log_softmax(hidden @ weight.T / temp, -1)
    t_logp = F.log_softmax((teacher_hidden @ weight.T).detach() / temp, -1)
    want_BT = losses.alpha_divergence(s_logp, t_logp, 0.5) * mask
    got_BT = losses.kl_alpha_chunked_per_token(hidden, teacher_hidden, weight, mask, 0.5, chunk=4, temperature=temp)
    torch.testing.assert_close(got_BT, want_BT)
    torch.testing.assert_close(losses.kl_alpha_per_token(hidden @ weight.T, teacher_hidden @ weight.T, 0.5, temp) * mask,
                               want_BT)
    torch.testing.assert_close(kl_alpha_chunked(hidden, teacher_hidden, weight, mask, 0.5, 4, temperature=temp),
                               want_BT.sum() / mask.sum())
    (g_got,) = torch.autograd.grad(got_BT.sum(), hidden)
    (g_want,) = torch.autograd.grad(want_BT.sum(), hidden)
    torch.testing.assert_close(g_got, g_want)


def test_topk_divergence_at_a_temperature_is_the_divergence_of_the_divided_logits():
    gen = torch.Generator().manual_seed(5)
    s, te = 3 * torch.randn(2, 3, 9, generator=gen), 3 * torch.randn(2, 3, 9, generator=gen)
    got = losses.kl_alpha_topk_per_token(s, te, 0.5, 4, temperature=0.5)
    torch.testing.assert_close(got, losses.kl_alpha_topk_per_token(s / 0.5, te / 0.5, 0.5, 4))
    assert not torch.allclose(got, losses.kl_alpha_topk_per_token(s, te, 0.5, 4))
    assert torch.equal(losses.kl_alpha_topk_per_token(s, te, 0.5, 4, temperature=1.0),
                       losses.kl_alpha_topk_per_token(s, te, 0.5, 4))
    # K above the vocabulary is the whole vocabulary (the tail is then empty)
    torch.testing.assert_close(losses.kl_alpha_topk_per_token(s, te, 0.5, 100), losses.kl_alpha_per_token(s, te, 0.5))

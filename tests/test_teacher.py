"""Teacher context, token alignment of the scorer, and the teacher modes."""
import copy

import pytest
import torch

from agentopd.inference.base import apply_chat
from agentopd.rl.logprobs import sequence_logprobs
from agentopd.rl.teacher import (
    Teacher,
    TeacherTemplate,
    build_teacher_context,
    pick_demonstration,
    score,
    strip_think,
    teacher_contexts,
)
from agentopd.testbed.tiny import build_tiny

PROMPT = "What is 17 + 25?"
HEADER = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def ends_with_header(tok, ids):
    header = tok.encode(HEADER, add_special_tokens=False)
    return ids[-len(header):] == header


def train_step(model, seed=0):
    """One SGD step on a made-up loss, so the student's weights move."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    lps, _ = sequence_logprobs(model, [[1, 3, 50, 60]], [[70, 80, 90]])
    (-lps[0].sum()).backward()
    opt.step()
    opt.zero_grad()


def test_context_none_without_signal(tiny):
    _, tok = tiny
    assert build_teacher_context(tok, PROMPT, None, None) is None
    assert build_teacher_context(tok, PROMPT, "", None) is None
    ids = build_teacher_context(tok, PROMPT, "Your answer 41 is wrong.", None)
    text = tok.decode(ids)
    assert ends_with_header(tok, ids) and PROMPT in text and "41 is wrong" in text
    assert "Correct solution" not in text and text.rstrip().endswith("assistant")
    demo = build_teacher_context(tok, PROMPT, None, "17 + 25 = 42")
    assert "Correct solution" in tok.decode(demo) and "feedback" not in tok.decode(demo)


def test_context_uses_template_and_chat(tiny):
    _, tok = tiny
    tpl = TeacherTemplate(instruction="\nTry again.", system="You are careful.")
    ids = build_teacher_context(tok, PROMPT, "wrong", "42", tpl, max_tokens=512)
    msgs = [{"role": "system", "content": "You are careful."},
            {"role": "user", "content": PROMPT + tpl.demonstration.format(demonstration="42")
             + tpl.feedback.format(critique="wrong") + "\nTry again."}]
    assert ids == apply_chat(tok, msgs)


def test_critique_truncation_fits_max_tokens(tiny):
    _, tok = tiny
    critique = " ".join(f"test {i} failed: expected {i * 7} got {i * 3}." for i in range(200))
    full = build_teacher_context(tok, PROMPT, critique, None, max_tokens=100_000)
    short_ids = build_teacher_context(tok, PROMPT, None, "42", max_tokens=100_000)
    for cap in (len(full) - 1, 300, 120):
        ids = build_teacher_context(tok, PROMPT, critique, None, max_tokens=cap)
        assert ids is not None and cap - 8 <= len(ids) <= cap and ends_with_header(tok, ids)
        text = tok.decode(ids)
        assert PROMPT in text and "test 0 failed" in text and "Correctly solve the original question." in text
    # both blocks long: both are cut, both stay present, total fits
    ids = build_teacher_context(tok, PROMPT, critique, critique, max_tokens=300)
    assert len(ids) <= 300 and ends_with_header(tok, ids)
    assert "Correct solution" in tok.decode(ids) and "feedback" in tok.decode(ids)
    # a short demonstration keeps all of it; the critique gets the rest
    ids = build_teacher_context(tok, PROMPT, critique, "17 + 25 = 42", max_tokens=200)
    assert len(ids) <= 200 and "17 + 25 = 42" in tok.decode(ids)
    # not even the template fits: no context
    assert build_teacher_context(tok, PROMPT, critique, None, max_tokens=len(short_ids) - 10) is None


def test_pick_demonstration_never_self():
    group = [("a", True), ("b", False), ("c", True), ("d", False)]
    assert [pick_demonstration(group, i) for i in range(4)] == ["c", "a", "a", "a"]
    assert pick_demonstration([("a", True), ("b", False)], 0) is None
    assert pick_demonstration([("a", False), ("b", False)], 1) is None


def test_pick_demonstration_self_allowed():
    group = [("a", True), ("b", False), ("c", True)]
    assert [pick_demonstration(group, i, allow_self=True) for i in range(3)] == ["a", "a", "a"]
    assert pick_demonstration([("a", True), ("b", False)], 0, allow_self=True) == "a"
    assert pick_demonstration([("a", False), ("b", False)], 1, allow_self=True) is None


def test_strip_think():
    assert strip_think("<think>so 2+2\n=4</think>\n\nThe answer is 4.") == "The answer is 4."
    assert strip_think("a <think>x</think> b <think>y\n</think>c") == "a b c"  # non-greedy, each block
    assert strip_think("no tags here") == "no tags here"


def _contexts(tok, **options):
    """A group of two: sample 0 right (with a <think> block), sample 1 wrong with a critique."""
    from agentopd.config import TeacherConfig
    from agentopd.types import Generation, Judgement, Verdict

    texts = ["<think>17 + 25: 7 + 5 = 12, carry 1</think>\nThe answer is 42.", "The answer is 41."]
    samples = [Generation(tok.encode(x, add_special_tokens=False), [], x, "stop") for x in texts]
    judgements = [Judgement(Verdict(1.0, 1, 1, "ok"), "Correct."),
                  Judgement(Verdict(0.0, 0, 1, "wrong_answer"), "Your final answer 41 is incorrect.")]
    cfg = TeacherConfig(max_tokens=4096, **options)
    return [None if ids is None else tok.decode(ids) for ids in teacher_contexts(tok, [PROMPT], samples, judgements,
                                                                                    2, cfg)]


def test_teacher_options_change_the_context(tiny):
    _, tok = tiny
    right, wrong = _contexts(tok)  # today's default: no self-demonstration, critique kept, think kept
    assert right is None  # its only successful sibling is itself
    assert "41 is incorrect" in wrong and "Correct solution" in wrong and "<think>" in wrong and "42" in wrong
    right, wrong = _contexts(tok, drop_critique_with_demo=True)
    assert right is None and "41 is incorrect" not in wrong and "feedback" not in wrong and "42" in wrong
    _, wrong = _contexts(tok, strip_think=True)
    assert "<think>" not in wrong and "carry 1" not in wrong and "The answer is 42." in wrong
    right, wrong = _contexts(tok, self_demonstration=True)
    assert right is not None and "Correct solution" in right and "42" in right and "incorrect" not in right
    assert wrong == _contexts(tok)[1]  # the failed sample's context is unchanged
    # without a demonstration to show, the critique stays even with drop_critique_with_demo
    _, wrong = _contexts(tok, drop_critique_with_demo=True, context=["feedback"])
    assert "41 is incorrect" in wrong and "Correct solution" not in wrong


def test_score_token_alignment(tiny):
    model, tok = tiny
    teacher_ids = [build_teacher_context(tok, PROMPT, "wrong: 41", None),
                   build_teacher_context(tok, "Add 2 and 2.", None, "4")]
    responses = [tok.encode("The answer is 42.") + [tok.eos_token_id], [7, 300, 12]]
    lps, (vals, _) = score(model, teacher_ids, responses, micro_batch=2, topk=3)
    for p, r, lp in zip(teacher_ids, responses, lps):
        assert not lp.requires_grad and lp.shape == (len(r),)
        with torch.no_grad():
            logp_TV = model(input_ids=torch.tensor([p + r])).logits[0].float().log_softmax(-1)
        expect = logp_TV[torch.arange(len(p) - 1, len(p) + len(r) - 1), torch.tensor(r)]
        torch.testing.assert_close(lp, expect, atol=1e-5, rtol=0)
    assert vals[0].shape == (len(responses[0]), 3)


@pytest.fixture
def batch(tiny):
    _, tok = tiny
    return [build_teacher_context(tok, PROMPT, "wrong", None)], [[40, 41, 42, 43]]


def test_frozen_never_changes(tiny, batch):
    student = copy.deepcopy(tiny[0])
    teacher = Teacher(student, "frozen")
    before, _ = teacher.score(*batch)
    initial = copy.deepcopy(student.state_dict())
    for s in range(2):
        train_step(student, s)
        teacher.update(student)
    after, _ = teacher.score(*batch)
    torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)
    for k, v in teacher.model_for_scoring().state_dict().items():
        assert torch.equal(v, initial[k])
    assert not torch.allclose(score(student, *batch)[0][0], before[0])


def test_live_equals_student(tiny, batch):
    student = copy.deepcopy(tiny[0])
    teacher = Teacher(student, "live")
    train_step(student)
    teacher.update(student)
    assert teacher.model_for_scoring() is student
    torch.testing.assert_close(teacher.score(*batch)[0][0], score(student, *batch)[0][0], atol=0, rtol=0)


def test_ema_one_update(tiny):
    student = copy.deepcopy(tiny[0])
    teacher = Teacher(student, "ema", tau=0.25)
    old = {k: v.clone() for k, v in student.named_parameters()}
    train_step(student)
    teacher.update(student)
    mine = dict(teacher.model_for_scoring().named_parameters())
    moved = 0
    for k, new in student.named_parameters():
        torch.testing.assert_close(mine[k], 0.75 * old[k] + 0.25 * new.detach(), atol=1e-6, rtol=1e-6)
        moved += not torch.equal(old[k], new)
    assert moved > 0
    assert not any(p.requires_grad for p in teacher.model_for_scoring().parameters())


def test_trust_region_interpolates(tiny, batch):
    student = copy.deepcopy(tiny[0])
    frozen, live = Teacher(student, "frozen"), Teacher(student, "live")
    t0, t1, th = (Teacher(student, "trust_region", mix=m) for m in (0.0, 1.0, 0.5))
    train_step(student)
    for t in (frozen, live, t0, t1, th):
        t.update(student)
    f, lv = frozen.score(*batch)[0][0], live.score(*batch)[0][0]
    assert not torch.allclose(f, lv)
    torch.testing.assert_close(t0.score(*batch)[0][0], f, atol=1e-6, rtol=0)
    torch.testing.assert_close(t1.score(*batch)[0][0], lv, atol=1e-6, rtol=0)
    (p,), (r,) = batch
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = 0.5 * frozen.copy(input_ids=ids).logits + 0.5 * student(input_ids=ids).logits
    expect = logits[0].log_softmax(-1)[torch.arange(len(p) - 1, len(p) + len(r) - 1), torch.tensor(r)]
    torch.testing.assert_close(th.score(*batch)[0][0], expect, atol=1e-5, rtol=0)


def test_state_dict_roundtrip(tiny, batch):
    student = copy.deepcopy(tiny[0])
    teacher = Teacher(student, "ema", tau=0.5)
    train_step(student)
    teacher.update(student)
    state = teacher.state_dict()
    fresh = Teacher(copy.deepcopy(tiny[0]), "ema", tau=0.1)
    fresh.load_state_dict(state)
    assert fresh.tau == 0.5
    torch.testing.assert_close(fresh.score(*batch)[0][0], teacher.score(*batch)[0][0], atol=0, rtol=0)
    with pytest.raises(ValueError):
        Teacher(student, "frozen").load_state_dict(state)
    with pytest.raises(ValueError):
        Teacher(student, "nope")


def test_ema_with_lora_student(tiny):
    peft = pytest.importorskip("peft")
    student = peft.get_peft_model(copy.deepcopy(tiny[0]),
                                  peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    teacher = Teacher(student, "ema", tau=0.5)
    old = {k: v.clone() for k, v in student.named_parameters()}
    train_step(student)
    teacher.update(student)
    mine = dict(teacher.model_for_scoring().named_parameters())
    for k, new in student.named_parameters():
        torch.testing.assert_close(mine[k], 0.5 * old[k] + 0.5 * new.detach(), atol=1e-6, rtol=1e-6)
    assert any("lora" in k and not torch.equal(old[k], v) for k, v in student.named_parameters())


def test_lora_teacher_is_an_ema_of_the_adapter_on_the_shared_base(tiny, batch):
    peft = pytest.importorskip("peft")
    student = peft.get_peft_model(copy.deepcopy(tiny[0]), peft.LoraConfig(r=4, target_modules="all-linear",
                                                                           init_lora_weights=False))
    teacher = Teacher(student, "ema", tau=0.5)
    mine, theirs = dict(teacher.copy.named_parameters()), dict(student.named_parameters())
    for k, p in theirs.items():  # the base is shared (no second copy), the adapter is the teacher's own
        assert (mine[k] is p) == (not p.requires_grad), k
    assert set(teacher.state_dict()["model"]) == {k for k, p in theirs.items() if p.requires_grad}
    before = teacher.score(*batch)[0][0]
    train_step(student)
    teacher.update(student)
    assert not torch.equal(teacher.score(*batch)[0][0], before)  # its adapter moved
    fresh = Teacher(student, "ema", tau=0.5)
    fresh.load_state_dict(teacher.state_dict())
    torch.testing.assert_close(fresh.score(*batch)[0][0], teacher.score(*batch)[0][0], atol=0, rtol=0)


def test_shared_prefix_scoring_matches_full_forward(tiny):
    """Teacher scoring with repeated prompts forwarded once (KV cache repeated to the rows): the
    log-probs of the one full forward, up to float rounding; empty responses, distinct lengths and
    mixed prompt lengths included; distinct prompts only: the plain forward."""
    from agentopd.rl.logprobs import can_share_prefix

    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    P = [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [1, 2, 3], [5, 6, 7, 8, 9], [1, 2, 3], [4] * 8]
    R = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (7, 3, 9, 0, 5, 2)]
    assert can_share_prefix(model, P) and not can_share_prefix(model, P[4:])
    with torch.no_grad():
        full = sequence_logprobs(model, P, R, micro_batch=32, temperature=0.7)[0]
        shared = sequence_logprobs(model, P, R, micro_batch=32, temperature=0.7, share_prefix=True)[0]
    assert [len(x) for x in shared] == [len(r) for r in R]
    for a, b in zip(full, shared):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_shared_prefix_forward_gradients_match_full_forward(tiny):
    """The update's forward with a group's prompt forwarded once: the same hidden states and the same
    parameter gradients (through the repeated KV cache) as the one full forward, up to float rounding."""
    from agentopd.rl.logprobs import response_hidden, shared_prefix_hidden

    model = copy.deepcopy(tiny[0]).train()
    g = torch.Generator().manual_seed(1)
    P = [[5, 6, 7, 8, 9]] * 3 + [[1, 2, 3]] * 2
    R = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (4, 6, 1, 6, 0)]
    mask_BR1 = torch.tensor([[1.0] * len(r) + [0.0] * (6 - len(r)) for r in R])[..., None]
    got = []
    for fwd in (response_hidden, shared_prefix_hidden):
        model.zero_grad(set_to_none=True)
        h_BRH = fwd(model, P, R)
        (h_BRH.sin() * mask_BR1).sum().backward()
        got.append((h_BRH.detach() * mask_BR1, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(got[0][0], got[1][0], rtol=0, atol=1e-4)
    assert len(got[0][1]) == len(got[1][1]) > 0
    for a, b in zip(got[0][1], got[1][1]):  # float32 sums in another order: an error relative to the largest
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-6)

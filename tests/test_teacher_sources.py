"""The teacher's sources (agentopd.rl.teacher, agentopd.rl.models.load_teacher): what it sees
(``teacher.context``: feedback, demonstration, reference, or the student's own prompt) against
hand-built contexts, and which model it is (a separate frozen teacher model with the student's
tokenizer, never trained; another tokenizer refused in one line before any work)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agentopd.config import ConfigError, load
from agentopd.inference.base import apply_chat
from agentopd.rl.teacher import TeacherTemplate, context_rows, reference_text
from agentopd.config import TeacherConfig
from agentopd.train import train
from agentopd.types import Generation, Judgement, Verdict

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a Python function f(x) such that:\nf(1) == 3\nf(2) == 5"
REFERENCE = "def f(x):\n    return 2 * x + 1"


@pytest.fixture(scope="module")
def tok():
    from agentopd.testbed.tiny import build_tokenizer

    return build_tokenizer(seed=0)


def _rows(tok, context, references=(REFERENCE,), **options):
    """A group of two: sample 0 right, sample 1 wrong with a critique; each row's context as text."""
    texts = ["```python\ndef f(x):\n    return 2 * x + 1\n```", "```python\ndef f(x):\n    return x + 2\n```"]
    samples = [Generation(tok.encode(x, add_special_tokens=False), [], x, "stop") for x in texts]
    judgements = [Judgement(Verdict(1.0, 2, 2, "ok"), "All 2 tests passed."),
                  Judgement(Verdict(0.0, 1, 2, "wrong_answer"), "f(2) should be 5, got 4")]
    prompt_ids = apply_chat(tok, [{"role": "user", "content": PROMPT}])
    rows = context_rows(tok, [PROMPT], samples, judgements, 2, TeacherConfig(context=context, max_tokens=4096, **options),
                        TeacherTemplate(), references=[reference_text({"solution": r}, "code") if r else None
                                                       for r in references],
                        prompt_ids=[prompt_ids, prompt_ids])
    return rows, prompt_ids


def test_the_reference_block_sits_where_the_template_puts_it(tok):
    rows, _ = _rows(tok, ["reference", "demonstration", "feedback"], self_demonstration=True)
    wrong = tok.decode(rows[1].ids)
    t = TeacherTemplate()
    expect = apply_chat(tok, [{"role": "user", "content": PROMPT + t.reference.format(
        reference=f"```python\n{REFERENCE}\n```") + t.demonstration.format(
        demonstration="```python\ndef f(x):\n    return 2 * x + 1\n```") + t.feedback.format(
        critique="f(2) should be 5, got 4") + t.instruction}])
    assert rows[1].ids == expect  # prompt, reference, demonstration, feedback, instruction: in that order
    assert wrong.index(REFERENCE) < wrong.index("f(2) should be 5")
    assert rows[1].reference_shown and rows[1].critique_shown


def test_reference_only_shows_the_reference_to_every_sample(tok):
    rows, _ = _rows(tok, ["reference"])
    for r in rows:  # right or wrong, each sample's teacher sees the reference and nothing else
        text = tok.decode(r.ids)
        assert REFERENCE in text and "should be 5" not in text and "return x + 2" not in text
        assert r.reference_shown and not r.critique_shown and r.demonstration is None
    rows, _ = _rows(tok, ["reference"], references=(None,))  # a problem without a reference: no signal
    assert [r.ids for r in rows] == [None, None]


def test_a_plain_context_is_the_students_own_prompt_ids(tok):
    rows, prompt_ids = _rows(tok, [])
    assert [r.ids for r in rows] == [prompt_ids, prompt_ids]
    assert not any(r.reference_shown or r.critique_shown for r in rows)


def test_reference_text_fences_code_once():
    assert reference_text({"solution": REFERENCE}, "code") == f"```python\n{REFERENCE}\n```"
    fenced = f"```python\n{REFERENCE}\n```"
    assert reference_text({"solution": fenced}, "code") == fenced
    assert reference_text({"solution": "2 + 3 = 5. \\boxed{5}"}, "math") == "2 + 3 = 5. \\boxed{5}"
    assert reference_text({}, "code") is None and reference_text(None) is None


def test_truncation_shares_the_budget_among_the_blocks(tok):
    from agentopd.rl.teacher import _shares, build_teacher_context

    assert _shares([10, 100, 100], 90) == [10, 40, 40] and _shares([5, 5], 100) == [5, 5]
    long = "x = 1\n" * 300
    ids = build_teacher_context(tok, PROMPT, long, long, max_tokens=300, reference=long)
    assert ids is not None and len(ids) <= 300
    text = tok.decode(ids)
    assert text.count("x = 1") > 30 and "Correctly solve the original question." in text


def _cfg(tmp_path, *overrides):
    return load(str(ROOT / "configs" / "micro-sdpo.yaml"),
                [f"run.out={tmp_path / 'run'}", "run.progress=false", "model.path=tiny", "env.id=agentopd/Math-v0",
                 "env.kwargs.problems=arithmetic", "env.kwargs.levels=[1,2]", "eval.problems=0", "sampling.prompts_per_step=2",
                 "sampling.group_size=2", "sampling.max_new_tokens=8", "run.checkpoint_every=0", *overrides])


def test_a_teacher_with_another_tokenizer_fails_in_one_line_before_any_work(tmp_path):
    from agentopd.testbed.tiny import build_tiny
    from agentopd.train import check

    build_tiny(tmp_path / "other", vocab_size=400, seed=0)
    cfg = _cfg(tmp_path, f"teacher.model={tmp_path / 'other'}", "algo.loss=opd", "algo.distill_alpha=1",
               "teacher.context=[]")
    with pytest.raises(ConfigError) as e:
        check(cfg)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "other") in msg and "'tiny'" in msg and "tokenizer" in msg
    with pytest.raises(ConfigError, match="different tokenizers"):  # train refuses before it builds anything
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad, says", [
    (["teacher.context=[feedback, feedback]"], "teacher.context"),
    (["teacher.context=[]"], "shows the self-teacher nothing"),
    (["teacher.model=x", "teacher.base_url=http://127.0.0.1:9/v1"], "both set"),
    (["teacher.base_url=http://127.0.0.1:9/v1"], "served_model"),
])
def test_bad_teacher_settings_are_one_line_errors(tmp_path, bad, says):
    from agentopd.train import check

    with pytest.raises(ConfigError, match=says) as e:
        check(_cfg(tmp_path, *bad))
    assert "\n" not in str(e.value)


def test_the_old_context_switches_name_their_replacement(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher.use_critique' is gone: use teacher.context"):
        _cfg(tmp_path, "teacher.use_critique=false")


@pytest.mark.parametrize("topk", [0, 100])  # full vocabulary (the teacher's own head, another width) and top-K
def test_opd_from_a_separate_teacher_model_trains_the_student_and_never_the_teacher(tmp_path, topk):
    """Vanilla OPD: a frozen teacher model with the student's tokenizer (another width and depth),
    the student's own prompt as its context; the student learns, the teacher's weights stay."""
    from agentopd.inference import load_pretrained
    from agentopd.testbed.tiny import build_tiny

    build_tiny(tmp_path / "teacher", hidden=96, layers=3, seed=0)  # the tokenizer of seed 0, other weights
    before = {k: v.clone() for k, v in load_pretrained(str(tmp_path / "teacher"))[0].state_dict().items()}
    cfg = _cfg(tmp_path, f"teacher.model={tmp_path / 'teacher'}", "teacher.context=[]", "algo.loss=opd",
               "algo.distill_alpha=1", "algo.trust_region=0.1", "optim.epochs_per_batch=2", "run.steps=2",
               "optim.lr=0.01", f"algo.distill_topk={topk}")
    rows = train(cfg)
    assert all(r["teacher_signal_frac"] == 1.0 for r in rows)  # every sample has a teacher signal
    assert all(r["distill_loss"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert any(r.get("trust_loss", 0) > 0 for r in rows)  # the second epoch moved away from pi_old
    student = load_pretrained(str(tmp_path / "run" / "final"))[0].state_dict()
    fresh = load_pretrained("tiny")[0].state_dict()
    assert any(not torch.equal(student[k], fresh[k]) for k in fresh)
    teacher = load_pretrained(str(tmp_path / "teacher"))[0].state_dict()
    assert all(torch.equal(teacher[k], before[k]) for k in before)


def test_the_separate_teacher_scores_with_its_own_model_on_its_own_device_and_dtype(tmp_path):
    from agentopd.rl.models import load_teacher
    from agentopd.testbed.tiny import build_tiny

    build_tiny(tmp_path / "teacher", hidden=96, layers=3, seed=0)  # the tokenizer of seed 0, other weights
    student, _ = build_tiny(seed=0)
    cfg = _cfg(tmp_path, f"teacher.model={tmp_path / 'teacher'}", "teacher.context=[]", "teacher.dtype=bfloat16")
    teacher = load_teacher(cfg.teacher, student, torch.device("cpu"))
    assert teacher.mode == "model" and teacher.state_dict()["model"] is None
    m = teacher.model_for_scoring()
    assert m is not student and m.config.hidden_size == 96
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in m.parameters())

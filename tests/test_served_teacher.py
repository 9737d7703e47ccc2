"""The served teacher (agentopd.rl.served) against a real HTTP server on loopback that computes
vLLM-shaped ``prompt_logprobs`` with the tiny Llama (tests/logprob_server.py): its scores equal the
in-process teacher's, a failing server costs only the rows it failed, and the tokenizer check."""
import sys
import warnings
from pathlib import Path

import pytest
import torch
from logprob_server import LogprobServer

import agentopd.testbed
from agentopd.inference.base import apply_chat
from agentopd.rl.served import PROBE_TEXT, ServedTeacher
from agentopd.rl.teacher import score
from agentopd.testbed.tiny import build_tiny, build_tokenizer

K = 5
MICRO = str(Path(agentopd.testbed.__file__).parent / "micro_model")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(seed=0)


@pytest.fixture
def served(tiny, no_proxy):
    """``served(**kw)``: a LogprobServer of the tiny model named "tiny", closed when the test ends."""
    made = []

    def make(**kw):
        made.append(LogprobServer(*tiny, name="tiny", **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def rows(tok):
    """Teacher prompts (chat template applied) and responses of different lengths; the first
    prompt twice, with two responses."""
    questions = ["What is 17 + 25?", "def add(x, y):", "Solve it step by step: 3 * 4 - 5, then add 12."]
    answers = [" The answer is 42.", "\n    return x + y\n\nprint(add(1, 2))", "7", " So the total is 19."]
    prompts = [apply_chat(tok, [{"role": "user", "content": q}]) for q in questions]
    prompts.append(prompts[0])
    responses = [tok.encode(a, add_special_tokens=False) + [tok.eos_token_id] for a in answers]
    assert len({len(p) for p in prompts[:3]}) == 3 and len({len(r) for r in responses}) == 4
    return prompts, responses


def assert_same_scores(got, lps, vals, idx):
    """One row of the served teacher equals the in-process teacher's (top-K compared as sets of ids,
    values in order)."""
    R = len(lps)
    assert got.logprobs_R.dtype == torch.float32 and got.logprobs_R.shape == (R,)
    assert got.topk_ids_RK.dtype == torch.int64 and got.topk_ids_RK.shape == (R, K)
    assert got.topk_logprobs_RK.dtype == torch.float32 and got.topk_logprobs_RK.shape == (R, K)
    torch.testing.assert_close(got.logprobs_R, lps.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.topk_logprobs_RK, vals.float(), atol=1e-5, rtol=0)
    assert [set(r) for r in got.topk_ids_RK.tolist()] == [set(r) for r in idx.tolist()]


def test_scores_equal_the_in_process_teacher(tiny, served):
    model, tok = tiny
    server = served()
    prompts, responses = rows(tok)
    prompts, responses = [*prompts, prompts[1]], [*responses, []]  # and a row without a response
    teacher = ServedTeacher(server.url, "tiny", topk=K, api_key="sekrit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = teacher.score(prompts, responses)
    lps, (vals, idx) = score(model, prompts, responses, topk=K)
    assert len(got) == len(prompts)
    for g, lp, v, i in zip(got, lps, vals, idx):
        assert_same_scores(g, lp, v, i)
    assert got[-1].logprobs_R.shape == (0,)  # scored without a request
    sent = [r for r in server.requests if r["path"] == "/v1/completions"]
    assert sorted(r["body"]["prompt"] for r in sent) == sorted(p + r for p, r in zip(prompts, responses) if r)
    for r in sent:
        assert r["body"]["max_tokens"] == 1 and r["body"]["prompt_logprobs"] == K
        assert r["headers"]["authorization"] == "Bearer sekrit"


def test_topk_zero_gives_the_token_logprobs_only(tiny, served):
    model, tok = tiny
    prompts, responses = rows(tok)
    got = ServedTeacher(served().url, "tiny", topk=0).score(prompts, responses)
    lps, _ = score(model, prompts, responses)
    for g, lp in zip(got, lps):
        assert g.topk_ids_RK.shape == g.topk_logprobs_RK.shape == (len(lp), 0)
        torch.testing.assert_close(g.logprobs_R, lp.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fault", [("status", 500), ("garbage",), ("short", 1), ("slow", 20)],
                         ids=["http500", "garbage", "short", "timeout"])
def test_failed_rows_are_none_and_the_others_scored(tiny, served, fault):
    """Every attempt for the second row fails: that row is None (after one retry: two requests),
    the others are scored as without the fault, a warning counts the failure. A slow reply would
    bring the right scores after 20 s: None means the client gave up at its timeout."""
    model, tok = tiny
    prompts, responses = rows(tok)
    bad = prompts[1] + responses[1]
    server = served(fault=lambda ids, attempt: fault if ids == bad else None)
    teacher = ServedTeacher(server.url, "tiny", topk=K, timeout=1.0, max_retries=1)
    with pytest.warns(UserWarning, match="1 of 4 rows got no scores"):
        got = teacher.score(prompts, responses)
    assert got[1] is None
    lps, (vals, idx) = score(model, prompts, responses, topk=K)
    for b in (0, 2, 3):
        assert_same_scores(got[b], lps[b], vals[b], idx[b])
    assert server.attempts[tuple(bad)] == 2


def test_a_malformed_reply_is_asked_again(tiny, served):
    """A short reply and a reply that is not JSON, each the first time only: asked again, scored."""
    model, tok = tiny
    prompts, responses = rows(tok)
    first = {tuple(prompts[0] + responses[0]): ("short", 3), tuple(prompts[2] + responses[2]): ("garbage",)}
    server = served(fault=lambda ids, attempt: first.get(tuple(ids)) if attempt == 0 else None)
    teacher = ServedTeacher(server.url, "tiny", topk=K, timeout=5.0, max_retries=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = teacher.score(prompts, responses)
    lps, (vals, idx) = score(model, prompts, responses, topk=K)
    for b in range(4):
        assert_same_scores(got[b], lps[b], vals[b], idx[b])
    assert [server.attempts[k] for k in first] == [2, 2]


def test_an_unknown_model_fails_every_row_without_retries(served, tiny):
    prompts, responses = rows(tiny[1])
    server = served()
    teacher = ServedTeacher(server.url, "not-served", topk=K, max_retries=2)
    with pytest.warns(UserWarning, match="4 of 4 rows .*NotFoundError"):
        assert teacher.score(prompts, responses) == [None] * 4
    assert len(server.requests) == 4  # the 404 is final: one request per row


def other_tokenizers():
    from transformers import AutoTokenizer

    return {"micro": AutoTokenizer.from_pretrained(MICRO), "bpe400": build_tokenizer(vocab_size=400, seed=1)}


def test_check_tokenizer(tiny, served):
    tok = tiny[1]
    server = served()
    teacher = ServedTeacher(server.url, "tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        teacher.check_tokenizer(tok)  # the served model's own tokenizer: no error, no warning
    (asked,) = [r["body"] for r in server.requests if r["path"] == "/tokenize"]
    assert asked["add_special_tokens"] is False and asked["prompt"].startswith(PROBE_TEXT)
    for name, other in other_tokenizers().items():
        probe = asked["prompt"]
        assert other.encode(probe, add_special_tokens=False) != tok.encode(probe, add_special_tokens=False), name
        with pytest.raises(ValueError) as err:
            teacher.check_tokenizer(other)
        message = str(err.value)
        assert "\n" not in message and "'tiny'" in message, message
        assert (MICRO if name == "micro" else f"{type(other).__name__} (vocabulary 400)") in message, message


def test_check_tokenizer_warns_without_tokenize(tiny, served):
    server = served(tokenize=False)
    with pytest.warns(UserWarning, match="cannot check its tokenizer"):
        ServedTeacher(server.url, "tiny").check_tokenizer(tiny[1])
    assert [r["path"] for r in server.requests] == ["/tokenize"]


def test_without_openai_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(ImportError, match=r"agentopd\[llm\]"):
        ServedTeacher("http://127.0.0.1:9/v1", "tiny")


# ------------------------------------------------------------------------ training from a served teacher

ROOT = Path(__file__).resolve().parents[1]


def _train_cfg(tmp_path, name, *overrides):
    from agentopd.config import load

    return load(str(ROOT / "configs" / "micro-sdpo.yaml"),
                [f"run.out={tmp_path / name}", "run.progress=false", "model.path=tiny", "env.id=agentopd/Math-v0",
                 "env.kwargs.problems=arithmetic", "env.kwargs.levels=[1,2]", "eval.problems=0", "sampling.prompts_per_step=2",
                 "sampling.group_size=2", "sampling.max_new_tokens=8", "run.checkpoint_every=0", "run.steps=2",
                 "optim.lr=0.01", "teacher.context=[]", *overrides])


def _final(tmp_path, name):
    from agentopd.inference import load_pretrained

    return load_pretrained(str(tmp_path / name / "final"))[0].state_dict()


@pytest.mark.parametrize("loss", [["algo.loss=sdpo_token", "algo.distill_alpha=1"],
                                  ["algo.loss=opd", "algo.distill_alpha=1", "algo.distill_topk=0"]])
def test_training_from_the_served_teacher_equals_the_in_process_teacher_model(tmp_path, tiny, no_proxy, loss):
    """The same teacher (a wider tiny model with the student's tokenizer, plain prompt) in process and behind the loopback
    server: the same student after a step (a later step samples from it: a rounding difference could
    flip a sampled token). sdpo_token reads the teacher's log-probs of the sampled
    tokens; opd's divergence runs over the served top-K plus a tail bucket, here K = the whole
    vocabulary, so it equals the in-process full-vocabulary divergence."""
    from agentopd.train import train

    teacher = build_tiny(tmp_path / "teacher", hidden=96, layers=3, seed=0)  # served, and on disk for the local run
    server = LogprobServer(*teacher, name="tiny")
    try:
        train(_train_cfg(tmp_path, "local", f"teacher.model={tmp_path / 'teacher'}", "run.steps=1", "optim.lr=0.001",
                         *loss))
        rows = train(_train_cfg(tmp_path, "served", f"teacher.base_url={server.url}", "teacher.served_model=tiny",
                                f"teacher.served_topk={len(teacher[1])}", "run.steps=1", "optim.lr=0.001", *loss))
    finally:
        server.close()
    assert all(r["teacher_errors"] == 0 and r["teacher_signal_frac"] == 1.0 for r in rows)
    assert len([r for r in server.requests if r["path"].endswith("/completions")]) == 4  # every sample
    local, remote = _final(tmp_path, "local"), _final(tmp_path, "served")
    start = tiny[0].state_dict()
    import json

    first = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0]) for n in ("local", "served")]
    for key in ("loss", "grad_norm", "kl_teacher"):
        assert first[1][key] == pytest.approx(first[0][key], rel=1e-4, abs=1e-6)
    for k in local:  # Adam's step is lr-sized wherever the gradient is not ~0: within half of it
        torch.testing.assert_close(remote[k], local[k], atol=5e-4, rtol=0)
    assert any(not torch.equal(remote[k], start[k]) for k in start)


def test_a_failing_server_masks_its_rows_and_the_step_goes_on(tmp_path, tiny, served):
    """Every other request answers 500 (after the client's retries): those samples have no teacher
    signal and are counted in teacher_errors; training completes, never a crashed step."""
    from agentopd.train import train

    server = served(fault=lambda prompt, attempt: ("status", 500) if sum(prompt) % 2 else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the served teacher's per-call warning about the failed rows
        rows = train(_train_cfg(tmp_path, "run", f"teacher.base_url={server.url}", "teacher.served_model=tiny",
                                "teacher.timeout=5", "algo.loss=sdpo_token", "algo.distill_alpha=1"))
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)  # finite, no NaN
    errors = sum(r["teacher_errors"] for r in rows)
    assert 0 < errors < 8 and sum(r["teacher_signal_frac"] for r in rows) == pytest.approx(2 - errors / 4)

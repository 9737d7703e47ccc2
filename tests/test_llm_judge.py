"""The LLM judge (agentopd/judges/llm.py) against a real HTTP server on loopback that speaks the
OpenAI-compatible chat API and answers from a per-test script: successes, slow replies past the
timeout, HTTP errors, malformed replies, a server that is down, headers and request bodies, and the
bound on requests in flight. Also ``reward_stats`` over judgements with judge errors."""
from __future__ import annotations

import json
import math
import socket
import time

import pytest

pytest.importorskip("openai")

from agentopd.judges.base import judge_error, reward_stats  # noqa: E402
from agentopd.judges.llm import LLMJudge, MalformedReply, parse_reply  # noqa: E402
from agentopd.types import Judgement, Problem, Verdict  # noqa: E402

TIMEOUT = 0.5


@pytest.fixture
def judges(no_proxy):
    """``judges(server, **kw)``: LLMJudges with small timeouts and backoff, closed at the end."""
    made = []

    def make(server, **kw):
        kw.setdefault("timeout_s", TIMEOUT)
        kw.setdefault("backoff_s", 0.01)
        kw.setdefault("max_retries", 2)
        j = LLMJudge(model="fake-model", base_url=server.url if hasattr(server, "url") else server, **kw)
        made.append(j)
        return j

    yield make
    for j in made:
        j.close()


def reply(score, critique="fine") -> str:
    return json.dumps({"score": score, "critique": critique})


PROBLEM = Problem("q1", "Explain why the sky is blue.", "math", {"answer": "Rayleigh scattering SECRET-REF-91"})


def user_text(req) -> str:
    return "\n".join(m["content"] for m in req["body"]["messages"])


# ---------------------------------------------------------------------------------- success


def test_success_ok_and_wrong_answer_by_threshold(serve, judges):
    s = serve([reply(0.8, "mostly right"), reply(0.5, "half of it"),
               'Sure! ```json\n{"score": 1, "critique": ""}\n``` done'])
    j = judges(s, pass_threshold=0.7)
    a = j.judge(PROBLEM, "Because of scattering.")
    assert a.verdict.status == "ok" and a.verdict.score == pytest.approx(0.8) and a.verdict.passed == 1
    assert a.critique == "mostly right"
    b = j.judge(PROBLEM, "Because it reflects the sea.")
    assert b.verdict.status == "wrong_answer" and b.verdict.score == pytest.approx(0.5) and b.verdict.passed == 0
    assert b.critique == "half of it"
    c = j.judge(PROBLEM, "x")  # fenced JSON with prose around it
    assert c.verdict.status == "ok" and c.verdict.score == 1.0 and c.critique == ""
    assert len(s.requests) == 3
    req = s.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["model"] == "fake-model" and req["body"]["temperature"] == 0.0


def test_default_threshold_needs_a_full_score(serve, judges):
    s = serve([reply(0.99)])
    v = judges(s).judge(PROBLEM, "x").verdict
    assert v.status == "wrong_answer" and v.score == pytest.approx(0.99)


# ----------------------------------------------------------------------- timeouts, retries


def test_slow_then_fast_is_retried_to_success(serve, judges):
    s = serve([("slow", 3 * TIMEOUT, json.dumps({"score": 0.0, "critique": "too late"})), reply(1.0, "good")])
    j = judges(s, max_retries=2)
    t0 = time.monotonic()
    out = j.judge(PROBLEM, "x")
    assert out.verdict.status == "ok" and out.critique == "good"
    assert len(s.requests) == 2
    assert time.monotonic() - t0 < 10  # finished within a generous bound


def test_always_slow_is_a_judge_error(serve, judges):
    s = serve([("slow", 3 * TIMEOUT, json.dumps({"score": 1.0, "critique": ""}))])
    j = judges(s, max_retries=2)
    t0 = time.monotonic()
    out = j.judge(PROBLEM, "x")
    assert out.verdict.status == "judge_error" and math.isnan(out.verdict.score)
    assert "3 attempts" in out.verdict.details[0].error and "Timeout" in out.verdict.details[0].error
    assert len(s.requests) == 3
    assert time.monotonic() - t0 < 15  # finished within a generous bound


def test_http_500_then_success(serve, judges):
    s = serve([("status", 500), reply(1.0, "ok now")])
    out = judges(s).judge(PROBLEM, "x")
    assert out.verdict.status == "ok" and out.critique == "ok now"
    assert len(s.requests) == 2


def test_http_errors_every_time_are_a_judge_error(serve, judges):
    s = serve([("status", 503)])
    out = judges(s, max_retries=1).judge(PROBLEM, "x")
    assert out.verdict.status == "judge_error" and "503" in out.verdict.details[0].error
    assert "2 attempts" in out.verdict.details[0].error
    assert len(s.requests) == 2  # the client's retry only: a status it retried is not asked again here


@pytest.mark.parametrize("code", [400, 401, 404])
def test_a_request_the_client_does_not_retry_is_one_attempt(serve, judges, code):
    s = serve([("status", code), reply(1.0)])
    out = judges(s, max_retries=3).judge(PROBLEM, "x")
    assert out.verdict.status == "judge_error" and math.isnan(out.verdict.score)
    assert f"Error code: {code}" in out.verdict.details[0].error and "attempts" not in out.verdict.details[0].error
    assert len(s.requests) == 1


@pytest.mark.parametrize("content", [
    "I think it deserves a 7/10.",
    "{score: 1, critique: 'no quotes'}",
    json.dumps({"score": 1.5, "critique": "too high"}),
    json.dumps({"score": -0.1, "critique": "negative"}),
    json.dumps({"score": "0.9", "critique": "a string"}),
    json.dumps({"score": True, "critique": "a bool"}),
    json.dumps({"critique": "no score"}),
    json.dumps({"score": 0.5, "critique": ["not", "a", "string"]}),
    '{"score": NaN, "critique": ""}',
    "",
], ids=["prose", "not-json", "above-1", "below-0", "string", "bool", "missing", "critique-list", "nan",
        "empty"])
def test_malformed_replies_are_retried_then_a_judge_error(serve, judges, content):
    s = serve([content])
    out = judges(s, max_retries=2).judge(PROBLEM, "x")
    assert out.verdict.status == "judge_error" and math.isnan(out.verdict.score)
    assert "MalformedReply" in out.verdict.details[0].error
    assert len(s.requests) == 3  # max_retries + 1


def _completion(**choice) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "fake", "choices": [choice]}


BAD_SHAPES = {  # HTTP 200 answers that are not a chat completion a judge can use
    "html_page": ("raw", 200, "text/html", "<html><body><h1>502 Bad Gateway</h1></body></html>"),
    "invalid_json": ("raw", 200, "application/json", '{"choices": [{"message": '),
    "message_null": ("raw", 200, "application/json", _completion(index=0, finish_reason="stop", message=None)),
    "content_null": ("raw", 200, "application/json",
                     _completion(index=0, finish_reason="stop", message={"role": "assistant", "content": None})),
    "choices_null": ("raw", 200, "application/json", {"id": "x", "object": "chat.completion", "choices": None}),
    "choices_empty": ("raw", 200, "application/json", {"id": "x", "object": "chat.completion", "choices": []}),
    "a_json_list": ("raw", 200, "application/json", [1, 2, 3]),
    "plain_text": ("raw", 200, "text/plain", "upstream timed out"),
}


@pytest.mark.parametrize("shape", sorted(BAD_SHAPES))
def test_malformed_http_200_replies_are_judge_errors_per_sample(serve, judges, shape):
    """Each shape, alone and inside a batch of good replies: that sample is a judge_error that
    names the judge and its server, the others are judged, nothing raises."""
    bad = BAD_SHAPES[shape]
    s = serve(lambda body, n: bad if "BAD" in user_text({"body": body}) else reply(1.0, "good"))
    j = judges(s, max_retries=1)
    out = j.judge(PROBLEM, "BAD answer")
    assert out.verdict.status == "judge_error" and math.isnan(out.verdict.score)
    assert "fake-model" in out.verdict.details[0].error and s.url in out.verdict.details[0].error
    batch = j.judge_many([(PROBLEM, "fine"), (PROBLEM, "BAD"), (PROBLEM, "fine too")])
    assert [b.verdict.status for b in batch] == ["ok", "judge_error", "ok"]


def test_malformed_then_valid_succeeds(serve, judges):
    s = serve(["no json here", reply(2), reply(0.25, "weak")])
    out = judges(s, max_retries=3).judge(PROBLEM, "x")
    assert out.verdict.status == "wrong_answer" and out.verdict.score == 0.25 and out.critique == "weak"
    assert len(s.requests) == 3


def test_server_down_is_a_judge_error_not_an_exception(judges):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # nothing listens on that port now
    j = judges(f"http://127.0.0.1:{port}/v1", max_retries=1)
    out = j.judge(PROBLEM, "x")
    assert out.verdict.status == "judge_error" and math.isnan(out.verdict.score)
    assert "2 attempts" in out.verdict.details[0].error and "Connection" in out.verdict.details[0].error
    many = j.judge_many([(PROBLEM, "a"), (PROBLEM, "b")])
    assert [m.verdict.status for m in many] == ["judge_error"] * 2


def test_parse_reply_directly():
    assert parse_reply('{"score": 0, "critique": "wrong"}') == (0.0, "wrong")
    assert parse_reply('text {"score": 1} text') == (1.0, "")
    for bad in (None, "", "{}", '{"score": 2}', '{"score": "1"}'):
        with pytest.raises(MalformedReply):
            parse_reply(bad)


# --------------------------------------------------------------------- what reaches the server


def test_api_key_from_the_named_env_var(serve, judges, monkeypatch):
    monkeypatch.setenv("AGENTOPD_TEST_JUDGE_KEY", "sk-test-4242")
    s = serve([reply(1.0)])
    judges(s, api_key_env="AGENTOPD_TEST_JUDGE_KEY").judge(PROBLEM, "x")
    assert s.requests[0]["headers"]["authorization"] == "Bearer sk-test-4242"


def test_rubric_problem_and_response_reach_the_server(serve, judges):
    s = serve([reply(1.0)])
    rubric = "RUBRIC-7731 grade this.\nQ: {prompt}\nA: {response}\n{reference_block}Reply in JSON."
    judges(s, rubric=rubric, system="SYSTEM-PROMPT-55").judge(PROBLEM, "RESPONSE-TEXT-19")
    msgs = s.requests[0]["body"]["messages"]
    assert msgs[0] == {"role": "system", "content": "SYSTEM-PROMPT-55"}
    user = msgs[-1]["content"]
    assert msgs[-1]["role"] == "user"
    assert "RUBRIC-7731" in user and PROBLEM.prompt in user and "RESPONSE-TEXT-19" in user


def test_default_rubric_carries_problem_and_response(serve, judges):
    s = serve([reply(1.0)])
    judges(s).judge(PROBLEM, "RESPONSE-TEXT-20")
    text = user_text(s.requests[0])
    assert PROBLEM.prompt in text and "RESPONSE-TEXT-20" in text and '"score"' in text


@pytest.mark.parametrize("reveal", [False, True])
def test_reveal_reference_controls_the_reference_in_the_request(serve, judges, reveal):
    s = serve([reply(1.0)])
    judges(s, reveal_reference=reveal).judge(PROBLEM, "x")
    raw = json.dumps(s.requests[0]["body"])
    assert ("SECRET-REF-91" in raw) == reveal


def test_reveal_reference_uses_a_privileged_solution(serve, judges):
    s = serve([reply(1.0)])
    p = Problem("c1", "Write f.", "code", {"tests": []}, {"solution": "def f(): return SOLUTION_77"})
    judges(s, reveal_reference=True).judge(p, "x")
    assert "SOLUTION_77" in user_text(s.requests[0])


# ------------------------------------------------------------------------------ concurrency


def test_judge_many_bounds_requests_in_flight(serve, judges):
    s = serve([("slow", 0.2, json.dumps({"score": 1, "critique": ""}))])
    j = judges(s, concurrency=2, timeout_s=5.0)
    pairs = [(PROBLEM, f"answer {i}") for i in range(6)]
    seen = []
    out = j.judge_many(pairs, progress=seen.append)
    assert [o.verdict.status for o in out] == ["ok"] * 6 and sum(seen) == 6
    assert len(s.requests) == 6
    assert s.max_in_flight == 2  # concurrent, but never more than 2
    # every response was sent, each exactly once
    sent = sorted(user_text(r).split("Answer:\n")[1].split("\n")[0] for r in s.requests)
    assert sent == [f"answer {i}" for i in range(6)]


def test_judge_many_results_follow_input_order(serve, judges):
    s = serve([reply(1.0)])
    j = judges(s, concurrency=3)
    out = j.judge_many([(PROBLEM, str(i)) for i in range(5)])
    assert len(out) == 5 and all(o.verdict.status == "ok" for o in out)


# ----------------------------------------------------------------------------- reward stats


def test_reward_stats_leave_judge_errors_out():
    js = [Judgement(Verdict(1.0, 1, 1, "ok")), Judgement(Verdict(0.5, 0, 1, "wrong_answer")),
          Judgement(Verdict(0.0, 0, 1, "wrong_answer")), judge_error("boom"), judge_error("bang")]
    st = reward_stats(js)
    assert st["reward_mean"] == pytest.approx(0.5) and st["pass_rate"] == pytest.approx(1 / 3)
    assert st["judged"] == 3 and st["judge_errors"] == 2
    only_errors = reward_stats([judge_error("x")])
    assert math.isnan(only_errors["reward_mean"]) and math.isnan(only_errors["pass_rate"])
    assert only_errors["judged"] == 0 and only_errors["judge_errors"] == 1
    e = judge_error("why")
    assert e.verdict.status == "judge_error" and math.isnan(e.verdict.score) and e.verdict.details[0].error == "why"

"""Engines by name (agentopd/engines.py): ``hf`` on the tiny model on CPU; ``openai`` against a real
HTTP server on loopback (n samples, both endpoints, log-probs, timeouts and retries, HTTP errors,
the API key, the bound on requests in flight); ``vllm`` when vLLM and a GPU are there; a missing
optional engine is one clear error that names its extra."""
from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest
from openai_server import messages_text

from agentopd.inference import make_engine
from agentopd.inference.base import EngineError, sample_chat, sample_text

pytest.importorskip("openai")
TIMEOUT = 0.5


# ------------------------------------------------------------------------------------- hf


@pytest.fixture(scope="module")
def hf():
    return make_engine("hf", model="tiny", device="cpu", batch_size=4)


CONVS = [[{"role": "user", "content": "What is 2 + 3?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 12 * 4."}]]


def test_hf_chat_samples_ids_logprobs_and_text(hf):
    out = sample_chat(hf, CONVS, n=3, max_new_tokens=8, temperature=1.0, seed=0)
    assert [len(gs) for gs in out] == [3, 3]
    for gs in out:
        for g in gs:
            assert 0 < len(g.response_ids) <= 8 and len(g.logprobs) == len(g.response_ids)
            assert all(lp <= 0 for lp in g.logprobs) and g.finish_reason in ("stop", "length")
            assert g.text == hf.tokenizer.decode(g.response_ids, skip_special_tokens=True)
    again = sample_chat(hf, CONVS, n=3, max_new_tokens=8, temperature=1.0, seed=0)
    assert [[g.response_ids for g in gs] for gs in again] == [[g.response_ids for g in gs] for gs in out]


def test_hf_chat_is_the_chat_template_plus_generate(hf):
    from agentopd.inference.base import apply_chat

    direct = hf.generate([apply_chat(hf.tokenizer, c) for c in CONVS], n=2, max_new_tokens=6, seed=3)
    via = sample_chat(hf, CONVS, n=2, max_new_tokens=6, seed=3)
    assert [[g.response_ids for g in gs] for gs in via] == [[g.response_ids for g in gs] for gs in direct]


def test_hf_text_continues_a_raw_prompt(hf):
    out = sample_text(hf, ["def add(x, y):\n    return"], n=2, max_new_tokens=5, temperature=0)
    assert len(out) == 1 and len(out[0]) == 2
    assert out[0][0].response_ids == out[0][1].response_ids  # greedy
    assert len(out[0][0].response_ids) <= 5


# --------------------------------------------------------------------- names and extras


def test_unknown_engine_names_the_choices():
    with pytest.raises(ValueError, match="'bogus'.*hf, openai, vllm"):
        make_engine("bogus")
    with pytest.raises(ValueError, match="None"):
        make_engine({"model": "x"})


@pytest.mark.parametrize("name,module,extra", [("openai", "openai", "agentopd[llm]"), ("vllm", "vllm", "agentopd[vllm]")])
def test_missing_optional_engine_names_the_extra(monkeypatch, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ImportError) as e:
        make_engine(name, model="m")
    assert f"pip install '{extra}'" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------- openai


def openai(server, **kw):
    kw.setdefault("timeout_s", TIMEOUT)
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("max_retries", 2)
    return make_engine({"name": "openai", "model": "fake-model", "base_url": server.url, **kw})


def test_chat_n_samples_and_the_request(serve):
    s = serve(lambda body, i: [f"answer {k} to {body['messages'][-1]['content']}" for k in range(body["n"])])
    e = openai(s)
    out = e.generate_chat(CONVS, n=3, max_new_tokens=17, temperature=0.7, top_p=0.9, stop=["\n\n"], seed=5)
    assert [[g.text for g in gs] for gs in out] == [[f"answer {k} to {c[-1]['content']}" for k in range(3)] for c in CONVS]
    assert all(g.finish_reason == "stop" and g.response_ids == [] and g.logprobs == [] for gs in out for g in gs)
    assert len(s.requests) == 2 and {r["path"] for r in s.requests} == {"/v1/chat/completions"}
    bodies = sorted((r["body"] for r in s.requests), key=lambda b: len(b["messages"]))
    assert bodies[0]["messages"] == CONVS[0] and bodies[1]["messages"] == CONVS[1]
    for b in bodies:
        assert b["model"] == "fake-model" and b["n"] == 3 and b["max_tokens"] == 17 and b["stop"] == ["\n\n"]
        assert b["temperature"] == 0.7 and b["top_p"] == 0.9 and b["seed"] in (5, 6)
    e.close()


def test_completions_text_token_ids_and_logprobs(serve):
    s = serve(lambda body, i: ("length", "xyz") if isinstance(body["prompt"], list) else "abc")
    e = openai(s, endpoint="completions", logprobs=True)
    [[g]] = e.generate_text(["def f():"], n=1)
    assert g.text == "abc" and g.response_ids == [97, 98, 99] and g.logprobs == [-0.5] * 3 and g.finish_reason == "stop"
    [[a, b]] = e.generate([[1, 2, 3]], n=2, max_new_tokens=3)
    assert a.text == b.text == "xyz" and a.finish_reason == "length" and a.response_ids == [120, 121, 122]
    assert [r["path"] for r in s.requests] == ["/v1/completions"] * 2
    assert s.requests[0]["body"]["prompt"] == "def f():" and s.requests[1]["body"]["prompt"] == [1, 2, 3]
    assert s.requests[0]["body"]["logprobs"] == 1
    with pytest.raises(ValueError, match="needs endpoint 'chat'"):
        e.generate_chat(CONVS)
    with pytest.raises(ValueError, match="needs endpoint 'completions'"):
        openai(s).generate_text(["x"])


def test_chat_logprobs_are_parsed(serve):
    s = serve(["hi"])
    [[g]] = openai(s, logprobs=True).generate_chat(CONVS[:1])
    assert g.text == "hi" and g.response_ids == [104, 105] and g.logprobs == [-0.5, -0.5]
    assert s.requests[0]["body"]["logprobs"] is True


def test_a_server_that_ignores_n_is_asked_for_the_rest(serve):
    s = serve(lambda body, i: [f"only one #{i}"])  # like llama.cpp: one choice whatever n is
    [gs] = openai(s).generate_chat(CONVS[:1], n=3, seed=0)
    assert [g.text for g in gs] == ["only one #0", "only one #1", "only one #2"]
    assert [r["body"]["n"] for r in s.requests] == [3, 2, 1]
    assert len({r["body"]["seed"] for r in s.requests}) == 3  # each round its own seed


def test_per_sample_seeds_make_the_same_request_for_the_same_samples(serve):
    """``seeds``: a prompt's request for its samples is seeded from those samples' seeds, not from
    the other prompts of the call or their order; ``seed_per_sample``: one request per sample, each
    sending its own seed."""
    from agentopd.inference.base import derive_seed

    s = serve(lambda body, i: [f"x{k}" for k in range(body["n"])])
    e = openai(s)
    e.generate_chat(CONVS, n=2, seeds=[11, 12, 21, 22])
    e.generate_chat(CONVS[1:], n=2, seeds=[21, 22])
    seed_of = lambda r: (messages_text(r["body"]), r["body"]["seed"], r["body"]["n"])  # noqa: E731
    first, again = sorted(map(seed_of, s.requests[:2])), seed_of(s.requests[2])
    assert again in first and {x[1] for x in first} == {derive_seed(11, 12), derive_seed(21, 22)}
    with pytest.raises(ValueError, match="one per sample"):
        e.generate_chat(CONVS, n=2, seeds=[1, 2])
    s.requests.clear()
    out = openai(s, seed_per_sample=True).generate_chat(CONVS, n=2, seeds=[11, 12, 21, 22])
    assert [[g.text for g in gs] for gs in out] == [["x0", "x0"], ["x0", "x0"]]
    assert sorted((messages_text(r["body"]), r["body"]["seed"], r["body"]["n"]) for r in s.requests) == sorted(
        (messages_text({"messages": c}), sd, 1) for c, sds in zip(CONVS, ([11, 12], [21, 22])) for sd in sds)


def test_slow_reply_past_the_timeout_then_retry_succeeds(serve):
    s = serve([("slow", 3 * TIMEOUT, "too late"), "in time"])
    t0 = time.monotonic()
    [[g]] = openai(s, max_retries=2).generate_chat(CONVS[:1])
    assert g.text == "in time" and len(s.requests) == 2
    assert time.monotonic() - t0 < 3 * TIMEOUT + 5  # the slow reply was not waited for


def test_always_slow_raises_after_the_retries(serve):
    s = serve([("slow", 3 * TIMEOUT, "never")])
    with pytest.raises(EngineError, match="3 attempts.*Timeout"):
        openai(s, max_retries=2).generate_chat(CONVS[:1])
    assert len(s.requests) == 3


def test_http_500_then_success(serve):
    s = serve([("status", 500), ("status", 429), "fine"])
    [[g]] = openai(s, max_retries=2).generate_chat(CONVS[:1])
    assert g.text == "fine" and len(s.requests) == 3


def test_a_reply_without_choices_is_retried(serve):
    s = serve([[], "ok"])
    [[g]] = openai(s).generate_chat(CONVS[:1])
    assert g.text == "ok" and len(s.requests) == 2


@pytest.mark.parametrize("body", [("text/html", "<html><h1>502 Bad Gateway</h1></html>"),
                                  ("application/json", '{"choices": [{"message": '),
                                  ("application/json", [1, 2, 3]),
                                  ("application/json", {"object": "chat.completion", "choices": None})],
                         ids=["html", "invalid_json", "json_list", "choices_null"])
def test_a_malformed_http_200_is_asked_again_then_an_engine_error(serve, body):
    s = serve([("raw", 200, *body)])
    with pytest.raises(EngineError, match="no answer after 3 attempts; last: the reply") as e:
        openai(s, max_retries=2).generate_chat(CONVS[:1])
    assert "\n" not in str(e.value) and len(s.requests) == 3


def test_a_malformed_http_200_then_a_good_reply(serve):
    s = serve([("raw", 200, "text/html", "<html>busy</html>"), "ok"])
    [[g]] = openai(s, max_retries=1).generate_chat(CONVS[:1])
    assert g.text == "ok" and len(s.requests) == 2


def test_a_bad_request_is_not_retried(serve):
    s = serve([("status", 400)])
    with pytest.raises(EngineError, match="HTTP 400"):
        openai(s, max_retries=3).generate_chat(CONVS[:1])
    assert len(s.requests) == 1


def test_a_wrong_key_names_the_variable(serve):
    s = serve([("status", 401)])
    with pytest.raises(EngineError, match=r"HTTP 401 \(is \$MY_KEY_VAR set\?\)"):
        openai(s, api_key_env="MY_KEY_VAR").generate_chat(CONVS[:1])


def test_api_key_from_the_named_env_var(serve, monkeypatch):
    monkeypatch.setenv("AGENTOPD_TEST_ENGINE_KEY", "sk-engine-777")
    s = serve(["ok"])
    openai(s, api_key_env="AGENTOPD_TEST_ENGINE_KEY").generate_chat(CONVS[:1])
    assert s.requests[0]["headers"]["authorization"] == "Bearer sk-engine-777"


def test_concurrency_bound_and_input_order(serve):
    s = serve(lambda body, i: ("slow", 0.2, "re: " + body["messages"][-1]["content"]))
    convs = [[{"role": "user", "content": f"question {k}"}] for k in range(6)]
    out = openai(s, concurrency=2, timeout_s=5.0).generate_chat(convs)
    assert [gs[0].text for gs in out] == [f"re: question {k}" for k in range(6)]
    assert len(s.requests) == 6 and s.max_in_flight == 2
    assert sorted(messages_text(r["body"]) for r in s.requests) == [f"question {k}" for k in range(6)]


def test_bad_endpoint_is_an_error():
    with pytest.raises(ValueError, match="'chat' or 'completions'"):
        make_engine("openai", model="m", endpoint="responses")


# ----------------------------------------------------------------------------------- vllm


def _vllm_ready() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    import torch

    return None if torch.cuda.is_available() else "vLLM needs a GPU"


@pytest.mark.skipif(_vllm_ready() is not None, reason=str(_vllm_ready()))
def test_vllm_generates_with_logprobs_and_follows_loaded_weights(tmp_path):
    import torch

    from agentopd.inference.base import apply_chat
    from agentopd.inference.hf import HFEngine
    from agentopd.rl.logprobs import sequence_logprobs
    from agentopd.testbed.tiny import build_tiny

    model, tok = build_tiny(tmp_path)
    e = make_engine("vllm", model=str(tmp_path), gpu_memory_utilization=0.2, enforce_eager=True, dtype="float32")
    prompt = apply_chat(tok, CONVS[0])
    [gs] = e.generate([prompt], n=2, max_new_tokens=6, temperature=1.0, seed=0)
    assert len(gs) == 2 and all(len(g.logprobs) == len(g.response_ids) > 0 for g in gs)
    with torch.no_grad():
        ref = sequence_logprobs(model, [prompt], [gs[0].response_ids])[0][0]
    torch.testing.assert_close(torch.tensor(gs[0].logprobs), ref.cpu(), atol=2e-2, rtol=0)
    other, _ = build_tiny(seed=1)
    e.load_weights(other)
    [[g]] = e.generate([prompt], n=1, max_new_tokens=6, temperature=0)
    [[want]] = HFEngine(other, tok, device="cpu").generate([prompt], n=1, max_new_tokens=6, temperature=0)
    assert g.response_ids == want.response_ids
    assert json.dumps(g.logprobs)  # plain floats

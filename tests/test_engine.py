"""The tiny model, the HF engine's sampling loop and sequence_logprobs."""
import re

import pytest
import torch

from agentopd.inference.base import apply_chat
from agentopd.inference.hf import HFEngine
from agentopd.rl.logprobs import sequence_logprobs
from agentopd.testbed.tiny import build_tiny
from agentopd.types import Generation

HEADER = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tok = tiny
    short = apply_chat(tok, [{"role": "user", "content": "What is 2 + 3?"}])
    long = apply_chat(tok, [{"role": "system", "content": "You solve arithmetic step by step."},
                            {"role": "user", "content": "What is 123 * 45, and then add 7 to the result?"}])
    assert len(long) > len(short) + 5
    return short, long


def plain_logprobs_TV(model, ids):
    """log_softmax of a plain, unpadded, uncached forward: [T, V]."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_tiny_saves_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = build_tiny(tmp_path)
    model2, tok2 = AutoModelForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    text = "def add(x, y):\n    return x + y  # the answer is 42"
    assert tok2.encode(text) == tok.encode(text)
    assert tok2.decode(tok2.encode(text)) == text
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(model2(input_ids=ids).logits, model(input_ids=ids).logits)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 1?"}]
    ids2 = apply_chat(tok2, msgs)
    header = tok2.encode(HEADER, add_special_tokens=False)
    assert ids2 == apply_chat(tok, msgs) and ids2[-len(header):] == header
    assert ids2[0] == tok2.bos_token_id and tok2.pad_token_id is not None
    assert tok2.convert_ids_to_tokens(header[0]) == "<|im_start|>"


def test_tiny_deterministic_per_seed():
    (m1, _), (m2, _), (m3, _) = build_tiny(), build_tiny(), build_tiny(seed=1)
    for (n, a), b, c in zip(m1.named_parameters(), m2.parameters(), m3.parameters()):
        assert torch.equal(a, b), n
    assert not all(torch.equal(a, c) for a, c in zip(m1.parameters(), m3.parameters()))


def test_generate_shapes_and_limits(tiny, prompts):
    model, tok = tiny
    out = HFEngine(model, tok, batch_size=4).generate(list(prompts), n=3, max_new_tokens=7, seed=0)
    assert len(out) == 2 and all(len(gs) == 3 for gs in out)
    for g in (g for gs in out for g in gs):
        assert isinstance(g, Generation) and 1 <= len(g.response_ids) <= 7
        assert len(g.logprobs) == len(g.response_ids) and all(lp <= 0 for lp in g.logprobs)
        assert g.text == tok.decode(g.response_ids, skip_special_tokens=True)
        assert g.finish_reason == ("stop" if g.response_ids[-1] == tok.eos_token_id else "length")
        assert g.finish_reason == "stop" or len(g.response_ids) == 7


def test_generate_deterministic_with_seed(tiny, prompts):
    eng = HFEngine(*tiny)
    a = eng.generate(list(prompts), n=2, max_new_tokens=12, seed=3)
    b = eng.generate(list(prompts), n=2, max_new_tokens=12, seed=3)
    c = eng.generate(list(prompts), n=2, max_new_tokens=12, seed=4)
    ids = lambda out: [g.response_ids for gs in out for g in gs]
    assert ids(a) == ids(b) and [g.logprobs for g in a[0]] == [g.logprobs for g in b[0]]
    assert ids(a) != ids(c)


def test_left_padding_does_not_change_logprobs(tiny, prompts):
    model, tok = tiny
    short, long = prompts
    eng = HFEngine(model, tok)
    alone = eng.generate([short], n=2, max_new_tokens=16, seed=0)[0]
    batched = eng.generate([long, short], n=2, max_new_tokens=16, seed=0)[1]
    for g in alone + batched:  # sampling log-probs (T=1, top_p=1) == a fresh rescoring of the same ids
        lp, _ = sequence_logprobs(model, [short], [g.response_ids])
        torch.testing.assert_close(lp[0], torch.tensor(g.logprobs), atol=1e-4, rtol=0)
    g_alone = eng.generate([short], max_new_tokens=16, temperature=0)[0][0]
    g_batched = eng.generate([long, short], max_new_tokens=16, temperature=0)[1][0]
    assert g_alone.response_ids == g_batched.response_ids
    torch.testing.assert_close(torch.tensor(g_alone.logprobs), torch.tensor(g_batched.logprobs),
                               atol=1e-4, rtol=0)


def test_greedy_is_argmax_continuation(tiny, prompts):
    model, tok = tiny
    short, long = prompts
    out = HFEngine(model, tok).generate([long, short], max_new_tokens=10, temperature=0)
    for p, (g,) in zip([long, short], out):
        ids, expect_ids, expect_lp = list(p), [], []
        for _ in range(10):
            logp_V = plain_logprobs_TV(model, ids)[-1]
            expect_ids.append(int(logp_V.argmax()))
            expect_lp.append(float(logp_V.max()))
            ids.append(expect_ids[-1])
        assert g.response_ids == expect_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(expect_lp), atol=1e-4, rtol=0)


def test_temperature_and_top_p_logprobs(tiny, prompts):
    model, tok = tiny
    short, _ = prompts
    eng = HFEngine(model, tok)
    g = eng.generate([short], max_new_tokens=6, temperature=0.5, seed=1)[0][0]
    ids = short + g.response_ids
    with torch.no_grad():
        logits_TV = model(input_ids=torch.tensor([ids])).logits[0].float()
    expect = (logits_TV / 0.5).log_softmax(-1)[len(short) - 1:-1].gather(
        -1, torch.tensor(g.response_ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(g.logprobs), expect, atol=1e-4, rtol=0)
    # a tiny nucleus keeps only the top token: greedy ids, and a point mass (log-prob 0)
    nucleus = eng.generate([short], max_new_tokens=6, top_p=1e-6, seed=1)[0][0]
    greedy = eng.generate([short], max_new_tokens=6, temperature=0)[0][0]
    assert nucleus.response_ids == greedy.response_ids and nucleus.logprobs == [0.0] * 6


def test_stop_strings_truncate(tiny, prompts):
    model, tok = tiny
    short, _ = prompts
    eng = HFEngine(model, tok)
    full = eng.generate([short], max_new_tokens=40, seed=0)[0][0]
    # a stop string that ends exactly where a token ends (so a late check would overshoot)
    prefixes = [tok.decode(full.response_ids[:j], skip_special_tokens=True) for j in range(4, 41)]
    stop = next(t[-3:] for t in prefixes if re.fullmatch(r"[A-Za-z ]{2}[A-Za-z]", t[-3:]))
    k = next(k for k in range(1, 41) if stop in tok.decode(full.response_ids[:k], skip_special_tokens=True))
    g = eng.generate([short], max_new_tokens=40, seed=0, stop=["@@never@@", stop])[0][0]
    assert g.finish_reason == "stop" and g.response_ids == full.response_ids[:k]
    assert g.logprobs == full.logprobs[:k] and stop in g.text
    # eos: make the 4th greedy token an eos id; generation stops right after it, eos included
    greedy = eng.generate([short], max_new_tokens=10, temperature=0)[0][0]
    eng.eos_ids = {greedy.response_ids[3]}
    g = eng.generate([short], max_new_tokens=10, temperature=0)[0][0]
    first = greedy.response_ids.index(greedy.response_ids[3])
    assert g.response_ids == greedy.response_ids[:first + 1] and g.finish_reason == "stop"


def test_sequence_logprobs_match_plain_forward_and_topk(tiny, prompts):
    model, _ = tiny
    short, long = prompts
    P = [short, long, short[:3]]
    R = [[5, 6, 7, 8, 9], [42], list(range(100, 120))]
    lps, (vals, idx) = sequence_logprobs(model, P, R, micro_batch=2, topk=5)
    for p, r, lp, v, i in zip(P, R, lps, vals, idx):
        logp_TV = plain_logprobs_TV(model, p + r)[len(p) - 1:-1]
        assert lp.shape == (len(r),) and v.shape == i.shape == (len(r), 5)
        torch.testing.assert_close(lp, logp_TV.gather(-1, torch.tensor(r)[:, None]).squeeze(-1),
                                   atol=1e-5, rtol=0)
        tv, ti = torch.topk(logp_TV, 5, dim=-1)
        assert torch.equal(i, ti)
        torch.testing.assert_close(v, tv, atol=1e-5, rtol=0)
    assert sequence_logprobs(model, P, R, topk=0)[1] is None


def test_sequence_logprobs_with_grad(tiny, prompts):
    model, _ = tiny
    short, long = prompts
    lps, _ = sequence_logprobs(model, [short, long], [[5, 6, 7], [8, 9]])
    assert lps[0].requires_grad
    model.zero_grad()
    torch.cat(lps).sum().backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad()


@pytest.mark.parametrize("chunk", [0, 3])
def test_learner_logprobs_at_the_sampling_temperature_are_the_engines(chunk):
    """sequence_logprobs(temperature=T) is log_softmax(logits / T) gathered, and equals the engine's
    sampling log-probs at T (top-p 1), token for token; at T = 1 they would not match."""
    from agentopd.rl.logprobs import response_logits

    model, tok = build_tiny(seed=0)
    prompts = [[1, 5, 9, 30], [1, 7, 8]]
    gens = HFEngine(model, tok).generate(prompts, n=2, max_new_tokens=8, temperature=0.6, seed=4)
    flat = [(p, g) for p, gs in zip(prompts, gens) for g in gs]
    P, R = [p for p, _ in flat], [g.response_ids for _, g in flat]
    assert all(len(g.logprobs) == len(g.response_ids) > 0 for _, g in flat)
    with torch.no_grad():
        got = sequence_logprobs(model, P, R, chunk=chunk, temperature=0.6)[0]
        untempered = sequence_logprobs(model, P, R, chunk=chunk)[0]
        logits_BRV = response_logits(model, P, R)
    for b, (lp, (_, g)) in enumerate(zip(got, flat)):
        want = torch.log_softmax(logits_BRV[b, :len(R[b])].float() / 0.6, -1).gather(-1, torch.tensor(R[b])[:, None])
        torch.testing.assert_close(lp, want.squeeze(-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lp, torch.tensor(g.logprobs), atol=1e-5, rtol=1e-5)
    assert max(float((u - torch.tensor(g.logprobs)).abs().max()) for u, (_, g) in zip(untempered, flat)) > 1e-2


def test_generation_uses_the_current_cache_argument(tiny, prompts):
    import inspect
    import warnings

    model, tok = tiny
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # transformers 5.24 deprecates past_key_values
            out = HFEngine(model, tok).generate(list(prompts), n=2, max_new_tokens=6, seed=0)
    finally:
        hook.remove()
    assert all(len(g.response_ids) >= 1 for gs in out for g in gs)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert len(seen) > 1 and all(name in kw for kw in seen)
    assert name == "past_key_values" or not any("past_key_values" in kw for kw in seen)


def reference_generate(eng, prompt_ids, n, max_new_tokens, temperature=1.0, top_p=1.0, stop=(), seed=None):
    """The straightforward loop HFEngine.generate replaced: a host sync and, with stop strings, a
    text decode per token per row. The reference for test_generate_matches_the_reference_loop."""
    from agentopd.rl.logprobs import positions

    stop = list(stop)
    gen = torch.Generator(device=eng.device).manual_seed(seed) if seed is not None else None
    rows = [list(p) for p in prompt_ids for _ in range(n)]
    flat = []
    with torch.no_grad():
        for s in range(0, len(rows), eng.batch_size):
            batch = rows[s:s + eng.batch_size]
            B = len(batch)
            cache, logits_B1V, mask_BL = eng._prefill(batch)  # checked on its own below
            pos_B = positions(mask_BL)[:, -1]
            window = 4 * max((len(x) for x in stop), default=0) + 8
            resp, lps, reason = [[] for _ in range(B)], [[] for _ in range(B)], [None] * B
            for step in range(max_new_tokens):
                tok_B, lp_B = eng._pick(logits_B1V[:, -1], temperature, top_p, gen)
                toks, lp = tok_B.tolist(), lp_B.tolist()
                for b in range(B):
                    if reason[b] is not None:
                        continue
                    resp[b].append(toks[b])
                    lps[b].append(lp[b])
                    tail = eng.tokenizer.decode(resp[b][-window:], skip_special_tokens=True)
                    if toks[b] in eng.eos_ids or any(x in tail for x in stop):
                        reason[b] = "stop"
                if all(r is not None for r in reason) or step == max_new_tokens - 1:
                    break
                done_B = torch.tensor([r is not None for r in reason], device=eng.device)
                tok_B = tok_B.masked_fill(done_B, eng.pad_id)
                mask_BL = torch.cat([mask_BL, torch.ones_like(mask_BL[:, :1])], dim=1)
                pos_B = pos_B + 1
                logits_B1V = eng.model(input_ids=tok_B[:, None], attention_mask=mask_BL, position_ids=pos_B[:, None],
                                       use_cache=True, logits_to_keep=1, **cache).logits
            flat += [Generation(resp[b], lps[b], eng.tokenizer.decode(resp[b], skip_special_tokens=True),
                                reason[b] or "length") for b in range(B)]
    return [flat[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


def test_prefill_forwards_each_distinct_prompt_once(tiny, prompts):
    """A group's samples share their prompt's forward: the repeated rows' logits, mask and KV cache
    equal those of forwarding every row (to float rounding), and generation continues from them as
    from the full prefill."""
    from agentopd.inference.hf import _kv_cache
    from agentopd.rl.logprobs import pad_left, positions

    model, tok = tiny
    short, long = prompts
    rows = [short, short, long, short[:5], long, short]
    eng = HFEngine(model, tok)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        cache, logits_B1V, mask_BL = eng._prefill(rows)
    finally:
        hook.remove()
    assert calls == [torch.Size([3, len(long)])]  # the 3 distinct prompts, once each
    ids_BL, want_mask_BL = pad_left(rows, eng.pad_id, eng.device)
    want = _kv_cache(model)
    with torch.no_grad():
        want_B1V = model(input_ids=ids_BL, attention_mask=want_mask_BL, position_ids=positions(want_mask_BL),
                         use_cache=True, logits_to_keep=1, **want).logits
    assert torch.equal(mask_BL, want_mask_BL)
    torch.testing.assert_close(logits_B1V, want_B1V, atol=1e-5, rtol=0)
    got_c, want_c = next(iter(cache.values())), next(iter(want.values()))
    for a, b in zip(got_c.layers, want_c.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generate_matches_the_reference_loop(tiny, prompts, seed):
    """The on-device decode loop gives the same ids, log-probs (bit for bit), text and finish reasons
    as the straightforward loop, over several batches (one generator across them), with eos made
    frequent, and with stop strings taken from the samples themselves (so that some rows hit them)."""
    model, tok = tiny
    short, long = prompts
    P = [short, long, short[:5], long[:9]]
    eng = HFEngine(model, tok, batch_size=3)
    common = tok.encode(" the", add_special_tokens=False)[-1:]
    kw = dict(n=2, max_new_tokens=24, seed=seed)
    free = reference_generate(eng, P, **kw)
    texts = [g.text for gs in free for g in gs]
    stops = [t[len(t) // 2:len(t) // 2 + 3] for t in texts[seed::3] if len(t) > 8][:2] + ["@@never@@"]
    assert any(len(s) == 3 for s in stops)
    for setting in (dict(), dict(stop=stops), dict(temperature=0.7, top_p=0.9, stop=stops), dict(temperature=0)):
        for eos in ({tok.eos_token_id}, {tok.eos_token_id, *common, 7, 11}):
            eng.eos_ids = eos
            want = reference_generate(eng, P, **kw, **setting)
            got = eng.generate(P, **kw, **setting)
            assert got == want, (setting, eos)
            if setting == dict(stop=stops) and eos == {tok.eos_token_id}:  # the samples of ``free``
                assert sum(g.finish_reason == "stop" for gs in got for g in gs) >= 1
    eng.eos_ids = {tok.eos_token_id}


def test_per_sample_seeds_make_a_sample_independent_of_its_batch(tiny, prompts):
    """``seeds`` (one per sample): a sample's ids depend on its seed and prompt only, not on the
    prompts sharing its batch, the batch size or its place in the call; its log-probs stay those of
    the distribution it was drawn from (a fresh rescoring), with temperature and top-p too."""
    model, tok = tiny
    short, long = prompts
    for setting in (dict(), dict(temperature=0.7, top_p=0.9)):
        alone = HFEngine(model, tok).generate([short], n=2, max_new_tokens=16, seeds=[5, 6], **setting)[0]
        mixed = HFEngine(model, tok, batch_size=3).generate([long, short[:7], short], n=2, max_new_tokens=16,
                                                            seeds=[1, 2, 3, 4, 5, 6], **setting)[2]
        assert [g.response_ids for g in alone] == [g.response_ids for g in mixed], setting
        assert alone[0].response_ids != alone[1].response_ids
        for a, b in zip(alone, mixed):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    g = alone[0]  # T = 0.7, top-p 0.9: each id was inside the nucleus, its log-prob the renormalized one
    logp_TV = (plain_logprobs_TV(model, short + g.response_ids)[len(short) - 1:-1] / 0.7).log_softmax(-1)
    assert all(lp <= 0 for lp in g.logprobs)
    assert all(logp_TV[t, i] <= lp + 1e-4 for t, (i, lp) in enumerate(zip(g.response_ids, g.logprobs)))
    with pytest.raises(ValueError, match="one per sample"):
        HFEngine(model, tok).generate([short], n=2, max_new_tokens=4, seeds=[1])


def test_per_sample_seeds_draw_from_the_model_distribution(tiny, prompts):
    """Gumbel-max with per-sample generators samples the same distribution as multinomial: the
    first token's empirical frequencies over many seeds match its probabilities."""
    model, tok = tiny
    short, _ = prompts
    p_V = plain_logprobs_TV(model, short)[-1].exp()
    N = 400
    got = HFEngine(model, tok, batch_size=N).generate([short], n=N, max_new_tokens=1, seeds=list(range(N)))[0]
    freq_V = torch.bincount(torch.tensor([g.response_ids[0] for g in got]), minlength=p_V.numel()).float() / N
    top = p_V.topk(3).indices
    assert (freq_V[top] - p_V[top]).abs().max() < 0.08, (freq_V[top], p_V[top])

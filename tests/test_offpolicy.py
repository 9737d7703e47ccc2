"""Off-policy rollouts (agentopd.rl.offpolicy, agentopd.async_rollouts): the importance weights of
stale rows against a hand computation on a tiny model, ESS eviction (an evicted batch is never
used), reuse off is today's run, asynchronous rollouts the same run to run and resumed exactly."""
import contextlib
import math
from pathlib import Path

import pytest
import torch

from agentopd.config import ConfigError, load
from agentopd.rl import objectives, offpolicy
from agentopd.rl.learner import Batch, current_logprobs, pad_BT, update
from agentopd.rl.logprobs import lm_head_weight
from agentopd.testbed.tiny import build_tiny
from agentopd.train import check, train

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 9, 14, 3], [5, 9, 14, 3], [7, 2]]
RESPONSES = [[11, 40, 2, 19, 8], [12, 3], [30, 31, 32, 33]]


def _hand_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """The response's log-probs from one plain forward of prompt + response (no padding, no cache)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    logp = logits.log_softmax(-1)[len(prompt) - 1:len(prompt) + len(response) - 1]
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0]


def _perturbed(model, scale: float):
    """A copy of ``model`` with Gaussian noise of this scale on every weight (seeded)."""
    import copy

    other, g = copy.deepcopy(model), torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


def _batch(behaviour: list[torch.Tensor], stale: bool, adv: float = 1.0) -> Batch:
    mask_BT = pad_BT([[0.0] * len(r) for r in RESPONSES])[1]
    engine_BT = pad_BT([b.float() for b in behaviour])[0]
    B = len(RESPONSES)
    return Batch(PROMPTS, RESPONSES, [None] * B, mask_BT, torch.zeros(B), torch.zeros_like(mask_BT), None,
                 engine_BT, mask_BT.clone(), mask_BT.sum(), torch.tensor(1.0), None, adv * mask_BT,
                 stale_B=torch.ones(B) if stale else None)


def _algo(**kw):
    return load(None, [f"algo.{k}={v}" for k, v in kw.items()]).algo


def test_stale_rows_are_weighted_by_the_truncated_ratio_and_the_truncated_prefix_product():
    model, _ = build_tiny(seed=0)
    behaviour_model = _perturbed(model, 0.03)  # the weights that sampled the rows
    mu = [_hand_logprobs(behaviour_model, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    pi = [_hand_logprobs(model, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    cfg = load(None, ["optim.micro_batch=2", "optim.lr=1e-9"])
    clip = cfg.algo.rollout_is_clip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9)
    got = update(cfg.algo, cfg.optim, 1.0, model, opt, None, lm_head_weight(model), 4, contextlib.nullcontext,
                 _batch(mu, stale=True))
    every = []
    for b, (lp_pi, lp_mu) in enumerate(zip(pi, mu)):
        n = len(lp_pi)
        assert torch.allclose(got.old_BT[b, :n].double(), lp_pi, atol=1e-5)
        token = [min(math.exp(float(lp_pi[t] - lp_mu[t])), clip) for t in range(n)]
        prefix = [min(math.exp(float((lp_pi[:t] - lp_mu[:t]).sum())), clip) for t in range(n)]
        assert got.rollout_BT[b, :n].tolist() == pytest.approx(token, rel=1e-4)
        assert got.state_BT[b, :n].tolist() == pytest.approx(prefix, rel=1e-4)
        assert prefix[0] == 1.0
        every += token
    assert min(every) < 1 < max(every)  # the rows really are off-policy
    fresh = update(cfg.algo, cfg.optim, 1.0, model, opt, None, lm_head_weight(model), 4, contextlib.nullcontext,
                   _batch(mu, stale=False))
    assert torch.equal(fresh.state_BT, fresh.rollout_BT)  # fresh rows: today's rollout correction on every term
    off = load(None, ["optim.reuse.visitation=false"])
    got = update(cfg.algo, off.optim, 1.0, model, opt, None, lm_head_weight(model), 4, contextlib.nullcontext,
                 _batch(mu, stale=True))
    assert torch.equal(got.state_BT, torch.ones_like(got.state_BT))


def test_each_term_takes_its_own_weight_and_ess_is_the_formula():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    tb = objectives.TokenBatch(lp.clone().requires_grad_(), lp, torch.ones_like(lp), torch.full_like(lp, 1 / 3),
                               torch.full_like(lp, 1 / 3), torch.tensor([[1.0, 2.0, 0.5]]),
                               torch.tensor([[3.0, 0.0, 1.0]]), divergence_BT=torch.tensor([[0.1, 0.2, 0.4]]))
    algo = _algo(loss="mix", distill_weight=0.5, clip_low=0.2, clip_high=0.28)
    _, metrics = objectives.loss(algo, tb)
    assert metrics["pg_loss"] == pytest.approx(-0.5 * (1.0 + 2.0 + 0.5) / 3)  # ratio 1, advantage 1: the rollout weights
    assert metrics["distill_loss"] == pytest.approx(0.5 * (3 * 0.1 + 0 * 0.2 + 1 * 0.4) / 3)  # the state weights
    log_w = torch.tensor([[0.0, math.log(3.0), -5.0]])
    w = [1.0, 3.0, math.exp(-5.0)]
    assert offpolicy.ess_fraction(log_w, torch.ones_like(log_w)) == pytest.approx(sum(w) ** 2 / sum(x * x for x in w) / 3)
    assert offpolicy.weight_kinds(_algo(loss="opd"), True) == {"state"}
    assert offpolicy.weight_kinds(_algo(loss="pg"), True) == {"token"}
    assert offpolicy.weight_kinds(_algo(loss="mix", distill_weight=0.5), True) == {"token", "state"}
    assert offpolicy.weight_kinds(_algo(loss="opd"), False) == {"token"}


def test_the_cache_evicts_a_stale_batch_for_good_and_ages_batches_out():
    model, _ = build_tiny(seed=0)
    behaviour_model = _perturbed(model, 0.1)
    cfg = load(None, [])
    now = lambda b: current_logprobs(cfg.optim, 1.0, model, contextlib.nullcontext, b)  # noqa: E731
    same = [_hand_logprobs(model, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    other = [_hand_logprobs(behaviour_model, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    cache = offpolicy.ReplayCache(max_age=2, min_ess=0.9, visitation=True)
    for step, behaviour in ((0, other), (1, same)):
        b = _batch(behaviour, stale=False)
        cache.add(step, b, b.engine_BT, b.adv_BT)
    algo = _algo(loss="opd")
    got = cache.draw(2, algo, now)
    assert got.metrics["reuse_evicted"] == 1 and got.metrics["reuse_batches"] == 1  # the other model's batch: ESS low
    assert got.metrics["reuse_ess_min"] < 0.9
    assert torch.allclose(got.batches[0].old_BT, got.batches[0].engine_BT, atol=1e-5)  # on-policy: ratio 1
    assert [s for s, _ in cache.entries] == [1]  # evicted for good
    assert cache.draw(3, algo, now).metrics["reuse_batches"] == 1
    assert cache.draw(4, algo, now).metrics["reuse_batches"] == 0 and not cache.entries  # older than max_age
    assert cache.state_dict()["evicted"] == 1


def _cfg(out, *overrides):
    return load(str(ROOT / "configs" / "micro-sdpo.yaml"),
                [f"run.out={out}", "run.progress=false", "model.path=tiny", "env.id=agentopd/Math-v0",
                 "env.kwargs.problems=arithmetic", "env.kwargs.levels=[1,2]", "eval.problems=0",
                 "sampling.prompts_per_step=2", "sampling.group_size=3", "sampling.max_new_tokens=12",
                 "optim.lr=0.01", *overrides])


def _params(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out, "final", "model.safetensors")))


def test_reuse_off_is_todays_run_and_an_evicted_batch_is_never_used(tmp_path):
    train(_cfg(tmp_path / "off", "run.steps=3", "optim.reuse.max_age=0"))
    rows = train(_cfg(tmp_path / "evict", "run.steps=3", "optim.reuse.max_age=2", "optim.reuse.min_ess=1.0"))
    assert [r.get("reuse_batches", 0) for r in rows] == [0, 0, 0]
    assert rows[-1]["reuse_evicted_frac"] > 0  # they were cached, then evicted
    a, b = _params(tmp_path / "off"), _params(tmp_path / "evict")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    used = train(_cfg(tmp_path / "used", "run.steps=3", "optim.reuse.max_age=2", "optim.reuse.min_ess=0.0"))
    assert [r.get("reuse_batches", 0) for r in used] == [0, 1, 2]
    c = _params(tmp_path / "used")
    assert any(not torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def test_reuse_resumes_exactly_with_its_cache(tmp_path):
    common = ["optim.reuse.max_age=2", "optim.reuse.min_ess=0.0", "run.checkpoint_every=2"]
    train(_cfg(tmp_path / "a", "run.steps=4", *common))
    train(_cfg(tmp_path / "b", "run.steps=2", *common))
    rows = train(_cfg(tmp_path / "b", "run.steps=4", "run.resume=true", *common))
    assert [r["reuse_batches"] for r in rows] == [2, 2]  # the cache came back with the checkpoint
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_async_rollouts_are_stale_by_one_the_same_run_to_run_and_resume_exactly(tmp_path):
    common = ["run.async_steps=1", "run.checkpoint_every=2", "run.samples_every=1"]
    one = train(_cfg(tmp_path / "a", "run.steps=4", *common))
    assert [r.get("rollout_age", 0) for r in one] == [0, 1, 1, 1]
    assert all(0 < r["rollout_ess"] <= 1 for r in one[1:])
    two = train(_cfg(tmp_path / "b", "run.steps=4", *common))
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (tmp_path / "b" / "samples.jsonl").read_text()
    train(_cfg(tmp_path / "c", "run.steps=2", *common))
    rows = train(_cfg(tmp_path / "c", "run.steps=4", "run.resume=true", *common))
    assert [r["step"] for r in rows] == [3, 4]
    c = _params(tmp_path / "c")
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert [r["reward_mean"] for r in rows] == [r["reward_mean"] for r in one[2:]]
    sync = train(_cfg(tmp_path / "d", "run.steps=2", "run.samples_every=1"))
    assert [r["reward_mean"] for r in sync][:1] == [r["reward_mean"] for r in two][:1]  # step 1: the same weights
    assert two[1]["rollout_age"] == 1


def test_offpolicy_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="algo.rollout_is_clip > 0"):
        check(_cfg(tmp_path, "optim.reuse.max_age=1", "algo.rollout_is_clip=0"), load=False)
    with pytest.raises(ConfigError, match="run.async_steps runs the hf engine"):
        check(_cfg(tmp_path, "run.async_steps=1", "engine.name=vllm"), load=False)
    with pytest.raises(ConfigError, match="did you mean 'optim.reuse.min_ess'"):
        _cfg(tmp_path, "optim.reuse.min_es=0.5")

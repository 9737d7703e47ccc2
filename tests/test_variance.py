"""The gradient-variance diagnostic (agentopd/variance.py): exact on an enumerable toy against a brute
force by autograd of every per-token loss w.r.t. the LM head; the seeded projection; ``agentopd
diagnose variance`` end to end on the tiny model."""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentopd.rl import losses
from agentopd.variance import Projection, States, statistics

ROOT = Path(__file__).resolve().parents[1]
V, T, TAU, TOPK = 5, 3, 0.8, 2
PROMPT, TEACHER_PROMPT = [0], [1, 2]


def _lm(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).double().eval()


def _hidden(model, prompt, seqs):
    """The final hidden states predicting each response token, ``[S, T, H]``."""
    ids = torch.tensor([prompt + list(s) for s in seqs])
    h = model.model(input_ids=ids).last_hidden_state
    return h[:, len(prompt) - 1:-1]


class Toy:
    """Every response of length T over V tokens, its exact probability under the student, the
    states' hidden states and logits of both models, and a GRPO-like advantage per response."""

    def __init__(self):
        self.student, self.teacher = _lm(0), _lm(1)
        self.W = self.student.lm_head.weight
        self.seqs = list(itertools.product(range(V), repeat=T))
        self.h_STH = _hidden(self.student, PROMPT, self.seqs).detach()
        with torch.no_grad():
            self.ut_STV = self.teacher.lm_head(_hidden(self.teacher, TEACHER_PROMPT, self.seqs))
        self.u_STV = self.h_STH @ self.W.T  # with grad to W
        logp_STV = losses.tempered_logp(self.u_STV.detach(), TAU)
        a_ST = torch.tensor(self.seqs)
        self.p_S = logp_STV.gather(-1, a_ST[..., None])[..., 0].sum(-1).exp()
        reward_S = (a_ST == 1).sum(-1).double()
        self.adv_S = reward_S - (self.p_S * reward_S).sum()

    def states(self) -> States:
        S = len(self.seqs)
        w = (self.p_S / T)[:, None].expand(S, T).reshape(-1)
        return States(self.h_STH.reshape(S * T, -1), self.u_STV.detach().reshape(S * T, V),
                      self.ut_STV.reshape(S * T, V), torch.tensor(self.seqs).reshape(-1),
                      self.adv_S[:, None].expand(S, T).reshape(-1), w, w)


def _grad(loss, W):
    return torch.autograd.grad(loss, W, retain_graph=True)[0]


def _brute(toy: Toy, alpha: float) -> dict:
    """The exact figures by autograd of each per-token loss w.r.t. the head weight, per (response,
    position, action); ``enum`` the reverse KL's, ``alpha`` the divergence's."""
    W, feats = toy.W, {k: [] for k in ("samp", "enum", "alpha", "topk", "grpo")}
    weights, within, cache = [], 0.0, {}
    for i, seq in enumerate(toy.seqs):
        for t in range(T):
            key = (tuple(seq[:t]))
            if key not in cache:
                u, ut = toy.u_STV[i, t], toy.ut_STV[i, t]
                logp = losses.tempered_logp(u, TAU)
                c = (logp - losses.tempered_logp(ut, TAU)).detach()
                pi = logp.detach().exp()
                samp = torch.stack([_grad(c[a] * logp[a], W) for a in range(V)])
                lp = torch.stack([_grad(logp[a], W) for a in range(V)])
                enum = _grad(losses.kl_alpha_per_token(u[None], ut[None], 1.0, TAU)[0], W)
                at_alpha = _grad(losses.kl_alpha_per_token(u[None], ut[None], alpha, TAU)[0], W)
                topk = _grad(losses.kl_alpha_topk_per_token(u[None], ut[None], alpha, TOPK, TAU)[0], W)
                assert torch.allclose((pi[:, None, None] * samp).sum(0), enum, atol=1e-12)  # E_a[samp] = enum
                var = (pi * (samp - enum).pow(2).sum((1, 2))).sum()
                cache[key] = (samp, lp, enum, at_alpha, topk, float(var))
            samp, lp, enum, at_alpha, topk, var = cache[key]
            w = float(toy.p_S[i]) / T
            a = seq[t]
            feats["samp"].append(samp[a])
            feats["enum"].append(enum)
            feats["alpha"].append(at_alpha)
            feats["topk"].append(topk)
            feats["grpo"].append(-float(toy.adv_S[i]) * lp[a])
            weights.append(w)
            within += w * var
    w = torch.tensor(weights, dtype=torch.float64)
    out = {}
    for k, fs in feats.items():
        f = torch.stack(fs).reshape(len(fs), -1)
        m = (w[:, None] * f).sum(0)
        out[k] = (float((w * f.pow(2).sum(-1)).sum() - m.pow(2).sum()), float(m.pow(2).sum()))
    out["within"] = within
    return out


@pytest.fixture(scope="module")
def toy():
    return Toy()


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_exact_on_an_enumerable_toy(toy, alpha):
    assert float(toy.p_S.sum()) == pytest.approx(1.0, abs=1e-12)
    brute = _brute(toy, alpha)
    got = statistics([toy.states()], TAU, alpha, TOPK, None, bias_correct=False)
    est = got["estimators"]
    approx = lambda x: pytest.approx(x, rel=1e-6, abs=1e-12)
    rev = "enumerated" if alpha == 1.0 else "enumerated_reverse_kl"
    for name, k in (("enumerated", "alpha"), (rev, "enum"), ("enumerated_topk", "topk"), ("grpo", "grpo")):
        assert (est[name]["variance"], est[name]["mean_sq"]) == (approx(brute[k][0]), approx(brute[k][1])), name
    samp = est["sampled_token"]
    assert samp["variance"] == approx(brute["samp"][0]) and samp["measured"]["variance"] == approx(brute["samp"][0])
    assert samp["mean_sq"] == approx(brute["samp"][1]) and samp["measured"]["mean_sq"] == approx(brute["samp"][1])
    assert got["within_state"] == approx(brute["within"]) and got["within_state"] > 0
    assert got["across_state"] == est[rev]["variance"]  # the same numbers, exactly
    assert samp["variance"] == got["across_state"] + got["within_state"]
    assert brute["samp"][0] == pytest.approx(brute["enum"][0] + brute["within"], rel=1e-9)  # total variance
    assert est[rev]["snr"] >= samp["snr"] and got["snr_ratio_rao_blackwell"] >= 1.0
    assert set(est) == {"sampled_token", "enumerated", "enumerated_topk", "grpo"} | {rev}


def test_the_projection_is_seeded_and_close_on_average(toy):
    s = toy.states()
    exact = statistics([s], TAU, 1.0, TOPK, None, bias_correct=False)
    runs = [statistics([s], TAU, 1.0, TOPK, Projection(V, 8, 3, 4, seed=k), bias_correct=False) for k in range(200)]
    again = statistics([s], TAU, 1.0, TOPK, Projection(V, 8, 3, 4, seed=0), bias_correct=False)
    assert again == runs[0] and runs[1] != runs[0]
    for key in ("across_state", "within_state"):  # unbiased: the mean over 200 seeds within ~10%
        mean = sum(r[key] for r in runs) / len(runs)
        assert mean == pytest.approx(exact[key], rel=0.15), key
    mean = sum(r["estimators"]["grpo"]["variance"] for r in runs) / len(runs)
    assert mean == pytest.approx(exact["estimators"]["grpo"]["variance"], rel=0.15)


def test_chunks_add_up_and_the_bias_correction(toy):
    s = toy.states()
    whole = statistics([s], TAU, 1.0, TOPK, None, bias_correct=False)
    parts = [States(*(x[k:k + 40] for x in vars(s).values())) for k in range(0, len(s.action_N), 40)]
    chunked = statistics(parts, TAU, 1.0, TOPK, None, bias_correct=False)
    for name, e in whole["estimators"].items():
        for key in ("variance", "mean_sq", "snr"):
            assert chunked["estimators"][name][key] == pytest.approx(e[key], rel=1e-9), (name, key)
    e = statistics([s], TAU, 1.0, TOPK, None, bias_correct=True)["estimators"]["enumerated"]
    n = len(s.action_N)
    assert e["states"] == n and e["mean_sq"] == pytest.approx(max(e["mean_sq_raw"] - e["variance"] / (n - 1), 0.0))


# ----------------------------------------------------------------------------- the command line

TINY = ["model.path=tiny", "run.progress=false", "env.id=agentopd/Math-v0", "env.kwargs.problems=micro",
        "env.kwargs.levels=[1,2,3]", "sampling.max_new_tokens=8", "eval.problems=0"]


def cli(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "agentopd.cli", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cli_writes_variance_json(tmp_path):
    from agentopd.testbed.tiny import build_tiny

    build_tiny(tmp_path / "teacher", hidden=96, layers=3, seed=0)  # the student's tokenizer, other weights
    r = cli("diagnose", "variance", "--config", ROOT / "configs" / "micro-opd.yaml", *TINY,
            f"teacher.model={tmp_path / 'teacher'}", "sampling.prompts_per_step=3", "sampling.group_size=2",
            "--steps", 2, "--out", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert json.loads((tmp_path / "d" / "variance.json").read_text()) == report
    est = report["estimators"]
    assert set(est) == {"sampled_token", "enumerated", "enumerated_topk", "grpo"}
    assert report["rollouts"] == 12 and report["steps"] == 2 and report["distill_tokens"] == report["tokens"] > 0
    assert report["projection"] == {"vocab": 512, "hidden": 64, "d1": 256, "d2": 32, "seed": 0, "exact": False}
    for name in ("sampled_token", "enumerated", "enumerated_topk"):
        e = est[name]
        assert e["states"] == report["tokens"] and math.isfinite(e["variance"]) and e["variance"] > 0, name
        assert math.isfinite(e["snr"]) and 0 <= e["mean_sq"] <= e["mean_sq_raw"], name
    assert math.isfinite(est["sampled_token"]["measured"]["variance"])
    assert report["across_state"] == est["enumerated"]["variance"] and report["within_state"] > 0
    assert est["sampled_token"]["variance"] == report["across_state"] + report["within_state"]
    assert est["enumerated"]["snr"] >= est["sampled_token"]["snr"]  # Rao-Blackwell: the same mean, less variance
    assert report["snr_ratio_enumerated_vs_sampled"] >= 1.0
    assert "| estimator | variance | snr |" in r.stderr and "| enumerated_topk |" in r.stderr
    assert "across_state" in r.stderr


class AlternateJudge:
    """Every other sample correct: each group's rewards differ, so GRPO's advantages do not vanish."""

    def judge_many(self, pairs, progress=None):
        from agentopd.types import Judgement, Verdict

        return [Judgement(Verdict(float(k % 2), k % 2, 1, "ok" if k % 2 else "wrong_answer"), "")
                for k in range(len(pairs))]


def test_a_grpo_config_with_a_teacher_model(tmp_path):
    from agentopd.config import load
    from agentopd.testbed.tiny import build_tiny
    from agentopd.variance import diagnose_variance

    build_tiny(tmp_path / "teacher", hidden=96, layers=3, seed=0)
    cfg = load(str(ROOT / "configs" / "micro-grpo.yaml"), [*TINY, f"teacher.model={tmp_path / 'teacher'}",
               "sampling.prompts_per_step=2", "sampling.group_size=2", f"run.out={tmp_path / 'd'}"])
    report = diagnose_variance(cfg, judge=AlternateJudge())
    grpo = report["estimators"]["grpo"]
    assert report["objective"] == "pg" and "prepared as algo.loss=opd" in report["notes"][0] and len(report["notes"]) == 1
    assert grpo["variance"] > 0 and grpo["states"] == report["tokens"] and math.isfinite(grpo["snr"])
    assert report["rollouts"] == 4 and report["alpha"] == cfg.algo.distill_alpha
    assert json.loads((tmp_path / "d" / "variance.json").read_text()) == report


def test_cli_help_and_a_config_without_a_teacher(tmp_path):
    r = cli("diagnose", "variance", "--help")
    assert r.returncode == 0 and "--steps" in r.stdout and "algo.distill_topk" in r.stdout
    r = cli("diagnose", "variance", "--config", ROOT / "configs" / "micro-grpo.yaml", f"run.out={tmp_path}")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "reads no teacher: diagnose variance needs a distillation objective" in r.stderr

"""The self-teacher diagnostic (agentopd/diagnose.py): the AUC, ratios and blame on hand-made
tensors; ``agentopd diagnose teacher`` end to end on the tiny model (a scripted engine for exact
counts, the real engine through the CLI); the per-step teacher_auc / ratio_correct / ratio_wrong of
training."""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from agentopd.envs.procedural import HELDOUT_SEED, generated_problems, micro_solution
from agentopd.judges import BaseJudge

from agentopd.config import load
from agentopd.diagnose import (
    auc,
    blame,
    divergence,
    kind_stats,
    mean_ratios,
    sequence_ratios,
    step_metrics,
    token_spans,
)
from agentopd.train import train
from agentopd.types import Generation, Judgement, Verdict

ROOT = Path(__file__).resolve().parents[1]
KIND_KEYS = {"n", "n_correct", "n_wrong", "pass1", "pass1_wrong", "student_pass1_same", "gap", "auc", "auc_mean",
             "ratio_correct", "ratio_wrong", "n_blame", "blame_in_wrong", "blame_at_divergence",
             "ratio_at_divergence", "ratio_other"}
TINY = ["model.path=tiny", "run.progress=false", "env.id=agentopd/Math-v0", "env.kwargs.problems=micro", "env.kwargs.levels=[1,2,3]",
        "sampling.max_new_tokens=8"]


# ------------------------------------------------------------------------------------- AUC


def brute_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_auc_hand_computed_cases():
    assert auc([3.0, 2.0, 1.0, 0.0], [1, 1, 0, 0]) == 1.0  # perfect
    assert auc([3.0, 2.0, 1.0, 0.0], [0, 0, 1, 1]) == 0.0  # reversed
    assert auc([1.0, 1.0, 1.0], [1, 0, 0]) == 0.5  # all tied
    # pos {2, 1}, neg {1, 0}: pairs (2>1) (2>0) (1=1: 1/2) (1>0) -> 3.5 / 4
    assert auc([2.0, 1.0, 1.0, 0.0], [1, 1, 0, 0]) == 0.875
    # pos {0}, neg {1, 0, -1}: 0<1, 0=0, 0>-1 -> 1.5 / 3
    assert auc(torch.tensor([0.0, 1.0, 0.0, -1.0]), torch.tensor([True, False, False, False])) == 0.5
    assert auc([1.0, 2.0], [1, 1]) is None and auc([1.0], [0]) is None and auc([], []) is None


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_with_ties(seed):
    r = random.Random(seed)
    n = r.randint(2, 40)
    scores = [float(r.randint(-3, 3)) for _ in range(n)]  # few distinct values: many ties
    labels = [r.random() < 0.4 for _ in range(n)]
    labels[0], labels[1] = True, False
    assert auc(scores, labels) == pytest.approx(brute_auc(scores, labels), abs=1e-12)


# ---------------------------------------------------------------------------------- ratios


def _hand_batch():
    # rows: correct (ratio +1, +3), wrong (ratio -2, -4, 0), correct without tokens, wrong (ratio -1)
    ls_BT = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0], [-2.0, 0.0, 0.0]])
    lt_BT = torch.tensor([[0.0, 2.0, 9.0], [-3.0, -5.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 9.0, 9.0]])
    mask_BT = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    success_B = torch.tensor([True, False, True, False])
    return ls_BT, lt_BT, mask_BT, success_B


def test_sequence_and_mean_ratios_ignore_padding():
    ls_BT, lt_BT, mask_BT, success_B = _hand_batch()
    seq_B, mean_B = sequence_ratios(ls_BT, lt_BT, mask_BT)
    assert seq_B.tolist() == [4.0, -6.0, 0.0, -1.0] and mean_B.tolist() == [2.0, -2.0, 0.0, -1.0]
    rows = torch.ones(4, dtype=torch.bool)
    assert mean_ratios(ls_BT, lt_BT, mask_BT, success_B, rows) == (2.0, -7.0 / 4)  # token means, not row means
    assert mean_ratios(ls_BT, lt_BT, mask_BT, success_B, torch.tensor([False, True, True, True])) == (None, -7.0 / 4)


def test_step_metrics_use_only_the_rows_with_a_teacher_context():
    ls_BT, lt_BT, mask_BT, success_B = _hand_batch()
    got = step_metrics(ls_BT, lt_BT, mask_BT, torch.ones(4), success_B)
    # the empty correct row is left out: correct {4}, wrong {-6, -1}
    assert got == {"teacher_auc": 1.0, "ratio_correct": 2.0, "ratio_wrong": -7.0 / 4}
    lt2 = lt_BT.clone()
    lt2[3, 0] = 99.0  # the last wrong row now scores above the correct one ...
    assert step_metrics(ls_BT, lt2, mask_BT, torch.ones(4), success_B)["teacher_auc"] == 0.5
    # ... unless it has no teacher context
    masked = step_metrics(ls_BT, lt2, mask_BT, torch.tensor([1.0, 1.0, 1.0, 0.0]), success_B)
    assert masked == {"teacher_auc": 1.0, "ratio_correct": 2.0, "ratio_wrong": -2.0}
    assert step_metrics(ls_BT, lt_BT, mask_BT, torch.tensor([0.0, 1.0, 0.0, 1.0]), success_B)["teacher_auc"] is None


# ----------------------------------------------------------------------------------- blame


def test_divergence():
    assert divergence("12 + 7 = 19", "12 + 7 = 19") is None
    assert divergence("12 + 7", "12 + 7 = 19") is None  # a prefix: nothing in it is wrong yet
    assert divergence("12 + 7 = 18", "12 + 7 = 19") == 10
    assert divergence("12 + 7 = 19!", "12 + 7 = 19") == 11
    assert divergence("x", "12") == 0


def test_blame_on_a_hand_made_answer():
    reference = "7 + 8 = 15, 4 + 3 + 1 = 8. \\boxed{85}"
    response = "7 + 8 = 15, 4 + 3 + 1 = 9. \\boxed{95}"
    pieces = ["7 + 8", " = 15", ", 4 + 3 + 1", " = 9", ". \\boxed{", "95", "}", ""]  # "" : eos
    ends = list(itertools.accumulate(len(p) for p in pieces))
    spans = list(zip([0, *ends[:-1]], ends))
    assert "".join(pieces) == response
    d = divergence(response, reference)
    assert response[d] == "9" and spans[3][0] <= d < spans[3][1]  # the token " = 9"

    def at(k, low=-5.0):
        ratio = [0.0] * len(pieces)
        ratio[k] = low
        return blame(torch.tensor(ratio), spans, d)

    got = at(3)
    assert got["in_wrong"] and got["at_divergence"] and got["ratio_at"] == -5.0
    assert got["ratio_others"] == [0.0] * 7
    assert at(5)["in_wrong"] and not at(5)["at_divergence"]  # after the first wrong character
    assert at(7)["in_wrong"] and not at(7)["at_divergence"]  # eos, after it
    for k in (0, 1, 2):  # the correct prefix
        assert not at(k)["in_wrong"] and not at(k)["at_divergence"]
    assert at(1)["ratio_at"] == 0.0 and min(at(1)["ratio_others"]) == -5.0


def test_token_spans_cover_the_decoded_text():
    from agentopd.testbed.tiny import build_tokenizer

    tok = build_tokenizer()
    text = "9 + 6 = 15, 4 + 6 + 1 = 11. \\boxed{815}"
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    spans = token_spans(tok, ids)
    assert len(spans) == len(ids) and spans[-1] == (len(text), len(text))  # eos: empty, at the end
    assert "".join(text[s:e] for s, e in spans) == text
    assert [tok.decode([i]) for i in ids[:-1]] == [text[s:e] for s, e in spans[:-1]]


def test_kind_stats_on_hand_made_rows():
    ls_BT, lt_BT, mask_BT, success_B = _hand_batch()
    rows = [0, 1, 3]
    b = [{"in_wrong": True, "at_divergence": True, "ratio_at": -4.0, "ratio_others": [-2.0, 0.0]},
         {"in_wrong": False, "at_divergence": False, "ratio_at": None, "ratio_others": [-1.0]}]
    got = kind_stats(ls_BT[rows], lt_BT[rows], mask_BT[rows], success_B[rows], [True, True, None], [0.5, 0.5, 0.0], b)
    assert set(got) == KIND_KEYS
    assert (got["n"], got["n_correct"], got["n_wrong"], got["n_blame"]) == (3, 1, 2, 2)
    assert got["pass1"] == 1.0 and got["pass1_wrong"] == 1.0  # the judge error is left out of both
    assert got["student_pass1_same"] == 0.5 and got["gap"] == 0.5
    assert got["auc"] == 1.0 and got["auc_mean"] == 1.0 and got["ratio_correct"] == 2.0 and got["ratio_wrong"] == -1.75
    assert got["blame_in_wrong"] == 0.5 and got["blame_at_divergence"] == 0.5
    assert got["ratio_at_divergence"] == -4.0 and got["ratio_other"] == -1.0


# ------------------------------------------------------------------- the diagnostic, scripted


def _heldout(n):
    return generated_problems("micro", n, [1, 2, 3], HELDOUT_SEED)  # what eval.problems=n diagnoses


class Scripted:
    """An engine that answers without sampling: on a plain prompt, sample 1 of each group gives the
    reference with the boxed value off by one, the others the reference; on a teacher prompt, the
    reference. Records the teacher prompts it sees."""

    teacher_prompts: ClassVar[list] = []
    problems: ClassVar[list] = []

    def __init__(self, model, tokenizer, device=None):
        self.tok = tokenizer

    def _gen(self, text):
        ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
        return Generation(ids, [0.0] * len(ids), self.tok.decode(ids, skip_special_tokens=True), "stop")

    def generate(self, prompt_ids, n=1, **kw):
        out = []
        for ids in prompt_ids:
            text = self.tok.decode(ids)
            p = next(p for p in self.problems if p.prompt in text)
            teacher = "Correctly solve the original question." in text
            if teacher:
                Scripted.teacher_prompts.append(text)
            wrong = int(p.payload["answer"]) + 1
            out.append([self._gen(micro_solution(p, None if teacher or k != 1 else wrong)) for k in range(n)])
        return out


def test_diagnose_counts_contexts_and_teacher_samples_exactly(tmp_path):
    from agentopd.diagnose import diagnose_teacher

    P, G = 3, 3
    Scripted.problems, Scripted.teacher_prompts = _heldout(P), []
    cfg = load(None, [*TINY, f"run.out={tmp_path}", f"eval.problems={P}", f"sampling.group_size={G}"])
    report = diagnose_teacher(cfg, engine=Scripted)
    assert report["student_pass1"] == pytest.approx(2 / 3) and report["samples"] == P * G
    assert json.loads((tmp_path / "diagnose.json").read_text()) == report
    for kind, c in report["contexts"].items():
        assert set(c) == KIND_KEYS
        # every sample has a context: correct ones their own critique (critique), a correct sibling (the others)
        assert (c["n"], c["n_correct"], c["n_wrong"]) == (P * G, 2 * P, P), kind
        assert c["pass1"] == 1.0 and c["pass1_wrong"] == 1.0  # the scripted teacher always answers right
        assert c["student_pass1_same"] == pytest.approx(2 / 3) and c["gap"] == pytest.approx(1 / 3)
        assert 0.0 <= c["auc"] <= 1.0 and 0.0 <= c["auc_mean"] <= 1.0
        assert c["n_blame"] == P and c["blame_in_wrong"] is not None and isinstance(c["ratio_at_divergence"], float)
    assert list(report["contexts"]) == ["self+feedback", "self+demonstration", "self+feedback+demonstration",
                                        "self+reference"]  # micro problems have reference answers
    crit, demo, both, ref = (Scripted.teacher_prompts[k * P * G:(k + 1) * P * G] for k in range(4))
    assert sum("Correct: " in t for t in crit) == 2 * P and sum(" is incorrect." in t for t in crit) == P
    assert not any("Correct solution:" in t for t in crit)
    assert all("Correct solution:" in t and "feedback" not in t for t in demo)
    assert all("Correct solution:" in t for t in both) and sum("feedback" in t for t in both) == P
    assert all(micro_solution(p) in t for t, p in zip(ref[::G], Scripted.problems))
    from agentopd.diagnose import recommend

    assert report["recommendation"] == recommend(report["contexts"])
    assert report["recommendation"]["objective"] != "grpo"  # every teacher repairs every answer: gap 1/3
    assert "| auc |" in (tmp_path / "summary.md").read_text()


# ----------------------------------------------------------------------------- the command line


def cli(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "agentopd.cli", *map(str, args)], check=False,
                          capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_writes_diagnose_json_with_every_key(tmp_path):
    from agentopd.testbed.tiny import build_tiny

    build_tiny(tmp_path / "teacher", hidden=96, layers=3, seed=0)  # the student's tokenizer, other weights
    r = cli("diagnose", "teacher", "--config", ROOT / "configs" / "micro-sdpo.yaml", *TINY, "eval.problems=0",
            "sampling.group_size=2", "sampling.max_new_tokens=4", f"teacher.model={tmp_path / 'teacher'}",
            "teacher.context=[]", "--out", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert json.loads((tmp_path / "d" / "diagnose.json").read_text()) == report
    assert "eval.problems is 0: diagnosing on 50 held-out problems" in r.stderr
    assert report["problems"] == 50 and report["samples"] == 100 and report["group_size"] == 2
    assert 0.0 <= report["student_pass1"] <= 1.0
    assert list(report["contexts"]) == ["self+feedback", "self+demonstration", "self+feedback+demonstration",
                                        "self+reference", "model"]
    for c in report["contexts"].values():
        assert set(c) == KIND_KEYS
    assert report["contexts"]["model"]["n"] == 100  # the plain prompt: every sample has a teacher context
    assert report["recommendation"]["objective"] in ("distil", "blend", "grpo")
    crit = report["contexts"]["self+feedback"]
    assert crit["n"] > 0 and crit["n"] == crit["n_correct"] + crit["n_wrong"]
    assert crit["n_blame"] == crit["n_wrong"]  # the untrained model departs from every reference
    assert math.isfinite(crit["ratio_wrong"])
    assert "| figure | self+feedback | self+demonstration |" in r.stderr and "| ratio_wrong |" in r.stderr
    assert "recommendation: " in r.stderr


@pytest.mark.parametrize("args, message", [
    (["run.bogus=1"], "unknown config key 'run.bogus'"),
    # checked before the model loads: the missing checkpoint is never reached
    (["env.kwargs.problems=micro", "model.path=/nonexistent"], "env.kwargs.problems='micro' makes math problems, but env.id is agentopd/Code-v0"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    r = cli("diagnose", "teacher", "--config", ROOT / "configs" / "micro-sdpo.yaml", f"run.out={tmp_path}", *args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("agentopd: error: ") and message in r.stderr


# ----------------------------------------------------------------------------- per-step metrics


class EveryThirdWrong(BaseJudge):
    """Sample ``k`` of each call is correct unless ``k % 3 == 1``."""

    def judge_many(self, pairs, progress=None):
        return [Judgement(Verdict(0.0, 0, 1, "wrong_answer"), "Wrong.") if k % 3 == 1 else
                Judgement(Verdict(1.0, 1, 1, "ok"), "Correct.") for k in range(len(pairs))]


def _train(tmp_path, judge=None):
    cfg = load(str(ROOT / "configs" / "micro-sdpo.yaml"),
               [f"run.out={tmp_path}", "run.progress=false", "model.path=tiny", "env.id=agentopd/Math-v0", "env.kwargs.problems=arithmetic",
                "env.kwargs.levels=[1,2]", "eval.problems=0", "sampling.prompts_per_step=2",
                "sampling.group_size=3", "sampling.max_new_tokens=8", "run.steps=2", "run.checkpoint_every=0"])
    train(cfg, judge=judge)
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_train_logs_teacher_auc_and_ratios_each_step(tmp_path):
    rows = _train(tmp_path / "wrong")  # the tiny model never answers right: one class only
    assert len(rows) == 2
    for r in rows:
        assert r["teacher_auc"] is None and r["ratio_correct"] is None
        assert r["ratio_wrong"] == pytest.approx(-r["kl_teacher"], abs=1e-6)  # every teacher token is a wrong sample's
    for r in _train(tmp_path / "mixed", EveryThirdWrong()):  # correct samples have a correct sibling: both classes
        assert 0.0 <= r["teacher_auc"] <= 1.0 and math.isfinite(r["ratio_correct"]) and math.isfinite(r["ratio_wrong"])


@pytest.mark.parametrize("gaps, aucs, objective, source", [
    ({"self+feedback": 0.02, "model": 0.30}, {"self+feedback": 0.9, "model": 0.8}, "distil", "model"),
    # a self-teacher shown the reference beats the model teacher on the gap: still the model (learnable)
    ({"self+reference": 0.40, "model": 0.15}, {"self+reference": 0.95, "model": 0.7}, "distil", "model"),
    ({"self+feedback": 0.02, "model": 0.30}, {"self+feedback": 0.9, "model": 0.5}, "blend", "model"),  # no separation
    ({"self+feedback": 0.05, "self+reference": 0.20}, {"self+feedback": 0.9, "self+reference": 0.9}, "blend",
     "self+reference"),  # no teacher model: a self-teacher only ever blends
    ({"self+feedback": -0.05, "model": 0.0}, {"self+feedback": 0.9, "model": 0.9}, "grpo", None),
])
def test_the_recommendation_follows_the_rule(gaps, aucs, objective, source):
    from agentopd.diagnose import recommend

    contexts = {k: {"gap": g, "auc": aucs[k], "pass1": 0.3 + g, "student_pass1_same": 0.3} for k, g in gaps.items()}
    got = recommend(contexts)
    assert got["objective"] == objective and got["source"] == source and got["why"]

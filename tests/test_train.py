"""The training loop on the tiny model, CPU: resume is exact, bad samples never abort a step,
the shipped configs run."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentopd.config import load
from agentopd.engine import HFEngine
from agentopd.judges import BaseJudge, judge_error
from agentopd.judges.math import MathJudge
from agentopd.train import TrainConfig, train
from agentopd.types import Judgement, Verdict

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, *overrides):
    return load(TrainConfig, str(ROOT / "configs" / "micro-sdpo.yaml"),
                [f"run.out={tmp_path}", "run.progress=false", "sampling.prompts_per_step=2",
                 "sampling.group_size=3", "sampling.max_new_tokens=12", *overrides])


def _params(out):
    state = torch.load(sorted(Path(out, "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem[5:]))[-1],
                       weights_only=False)
    return state["model"]


@pytest.mark.parametrize("advantage", ["sd_token", "grpo"])
def test_resume_gives_the_same_parameters(tmp_path, advantage):
    straight = _cfg(tmp_path / "a", "run.steps=4", "run.checkpoint_every=2", f"algo.advantage={advantage}", "algo.advantage_kwargs={}")
    train(straight)
    first = _cfg(tmp_path / "b", "run.steps=2", "run.checkpoint_every=2", f"algo.advantage={advantage}", "algo.advantage_kwargs={}")
    train(first)
    resumed = _cfg(tmp_path / "b", "run.steps=4", "run.checkpoint_every=2", "run.resume=true",
                   f"algo.advantage={advantage}", "algo.advantage_kwargs={}")
    rows = train(resumed)
    assert [r["step"] for r in rows] == [3, 4]  # it continued, it did not start over
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if advantage == "sd_token":  # the critique gives signal even when no sample is rewarded
        from agentopd.tiny import build_tiny

        fresh = build_tiny(seed=0)[0].state_dict()
        assert any(not torch.equal(fresh[k], a[k]) for k in a)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]


class EmptyFirst(HFEngine):
    """The real engine, with the first sample of every step's first prompt made empty (as when a
    model emits end-of-sequence at once)."""

    def generate(self, *a, **kw):
        out = super().generate(*a, **kw)
        g = out[0][0]
        g.response_ids, g.logprobs, g.text = [], [], ""
        return out


class Troubled(BaseJudge):
    """The math judge, except that sample 1 of each batch crashes in the sandbox and sample 2's
    judge fails."""

    def __init__(self):
        from agentopd.sandbox import make_sandbox

        self.math = MathJudge(workers=1)
        self.sb = make_sandbox("bwrap", workers=1)

    def judge_many(self, pairs, progress=None):
        out = self.math.judge_many(pairs)
        crash = self.sb.run("import ctypes; ctypes.string_at(0)")  # segfault
        out[1] = Judgement(Verdict(0.0, 0, 1, "runtime_error"), f"crashed: exit {crash.exit_code}")
        out[2] = judge_error("the judge is down")
        return out

    def close(self):
        self.math.close()
        self.sb.close()


def test_crash_judge_error_and_empty_response_do_not_abort_a_step(tmp_path):
    j = Troubled()
    rows = train(_cfg(tmp_path, "run.steps=2"), engine=EmptyFirst, judge=j)
    assert len(rows) == 2
    for r in rows:
        assert r["judge_errors"] == 1 and r["judged"] == 5 and r["empty_responses"] == 1
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert r["teacher_signal_frac"] < 1.0  # the judge error and the empty response carry no signal


@pytest.mark.parametrize("name", ["micro-sdpo.yaml", "micro-grpo.yaml"])
def test_shipped_configs_run_two_steps(tmp_path, name):
    r = subprocess.run([sys.executable, "-m", "agentopd.cli", "train", "--config", str(ROOT / "configs" / name),
                        "run.steps=2", f"run.out={tmp_path}", "run.progress=false"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2]
    assert all(k in rows[0] for k in ("reward_mean", "pass_rate", "judge_errors", "adv_mean", "kl_teacher",
                                      "response_len", "tokens_per_s", "time_generate", "time_execute",
                                      "time_score", "time_update"))
    assert (tmp_path / "checkpoints" / "step-2.pt").exists()


def test_estimator_arguments_are_checked_before_any_work(tmp_path):
    from agentopd.config import ConfigError

    with pytest.raises(ConfigError, match="grpo does not take \\['clamp'\\]"):
        train(_cfg(tmp_path, "algo.advantage=grpo"))
    with pytest.raises(ConfigError, match="unknown estimator 'gpro'"):
        train(_cfg(tmp_path, "algo.advantage=gpro"))


@pytest.mark.parametrize("topk", [0, 5])
def test_distillation_loss_alone_moves_the_model(tmp_path, topk):
    # grpo on a batch that is never rewarded has zero advantages: any change comes from distillation
    rows = train(_cfg(tmp_path, "run.steps=2", "algo.advantage=grpo", "algo.advantage_kwargs={}",
                      "algo.distill_weight=1.0", f"algo.distill_topk={topk}", "teacher.mode=frozen"))
    assert all(r["adv_mean"] == 0.0 and r["distill_loss"] > 0 and r["grad_norm"] > 0 for r in rows)
    from agentopd.tiny import build_tiny

    fresh = build_tiny(seed=0)[0].state_dict()
    trained = _params(tmp_path)
    assert any(not torch.equal(fresh[k], trained[k]) for k in trained)

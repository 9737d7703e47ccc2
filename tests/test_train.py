"""The training loop on the tiny model, CPU: resume is exact, bad samples never abort a step,
the shipped configs run; logits from hidden states chunk by chunk (the same result as full logits,
never a [B, R, V] tensor), bf16 autocast, judging that overlaps generation, wandb's missing-package
error."""
import json
import math
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from agentopd.judges import BaseJudge, judge_error
from agentopd.judges.math import MathJudge
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from agentopd.config import load
from agentopd.inference.hf import HFEngine
from agentopd.train import train
from agentopd.types import Judgement, Verdict

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, *overrides):
    return load(str(ROOT / "configs" / "micro-sdpo.yaml"),
                [f"run.out={tmp_path}", "run.progress=false", "model.path=tiny", "env.id=agentopd/Math-v0", "env.kwargs.problems=arithmetic",
                 "env.kwargs.levels=[1,2]", "eval.problems=0", "sampling.prompts_per_step=2",
                 "sampling.group_size=3", "sampling.max_new_tokens=12", *overrides])


def _params(out):
    """The newest checkpoint's weights (a LoRA run's: its adapter), as saved."""
    from safetensors.torch import load_file

    from agentopd.rl.checkpoints import checkpoints

    step = Path(checkpoints(str(Path(out, "checkpoints")))[0])
    return load_file(next(f for f in (step / "model.safetensors", step / "adapter_model.safetensors") if f.exists()))


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
        from agentopd.testbed.tiny import build_tiny

        fresh = build_tiny(seed=0)[0].state_dict()
        assert any(not torch.equal(fresh[k], a[k]) for k in a)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]


def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    common = ["run.steps=4", "run.checkpoint_every=2", "optim.lr=0.01", "algo.ref_kl=0.1"]
    train(_cfg(tmp_path / "a", *common))
    train(_cfg(tmp_path / "b", *common))
    latest = tmp_path / "b" / "checkpoints" / "step-4" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a crash while copying it away
    (tmp_path / "b" / "checkpoints" / "step-6.tmp").mkdir()  # a half-written one is never the latest
    (tmp_path / "b" / "final").rename(tmp_path / "b" / "final-old")
    with pytest.warns(UserWarning, match=r"step-4 is unreadable .*resuming from .*step-2"):
        rows = train(_cfg(tmp_path / "b", *common, "run.resume=true"))
    assert [r["step"] for r in rows] == [3, 4]
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in _fresh().items())


def test_old_pt_checkpoints_fail_with_what_to_do(tmp_path):
    from agentopd.config import ConfigError

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-2.pt").write_bytes(b"old pickle")
    with pytest.raises(ConfigError, match=r"old-format checkpoints .* set run.resume=false"):
        train(_cfg(tmp_path, "run.steps=3", "run.resume=true"))


def test_final_model_serves_eval_model_through_the_cli_and_trains_further(tmp_path):
    import yaml

    train(_cfg(tmp_path / "run", "run.steps=2"))
    final = tmp_path / "run" / "final"
    assert not (final / "trainer_state").exists() and (final / "chat_template.jinja").exists()
    cfg = {"model": {"path": str(final)}, "engine": {"name": "hf"},
           "env": {"id": "agentopd/Math-v0", "kwargs": {"problems": "arithmetic", "n": 2}},
           "sampling": {"max_new_tokens": 8}, "eval": {"samples": 2},
           "run": {"out": str(tmp_path / "eval"), "progress": False, "device": "cpu"}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "agentopd.cli", "eval", "model", "--config", str(tmp_path / "eval.yaml")],
                       capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["samples"] == 4
    # fine-tune further: the run starts from the final weights, not from the tiny model
    from agentopd.rl.models import load_model

    more = _cfg(tmp_path / "more", "run.steps=1", f"model.path={final}")
    loaded = load_model(more.model, more.run, torch.device("cpu"))[0].state_dict()
    saved = _params(tmp_path / "run")
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert len(train(more)) == 1


def test_lora_checkpoint_saves_the_adapter_and_its_merge_with_the_same_logits(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from agentopd.inference import load_pretrained

    train(_cfg(tmp_path, "run.steps=2", "model.lora_rank=4", "run.save_merged=true", "optim.lr=0.01"))
    final = tmp_path / "final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    ids = torch.tensor([[1, 5, 70, 9, 200, 300, 41]])
    models = {"peft": AutoPeftModelForCausalLM.from_pretrained(final),  # base named in adapter_config.json
              "merged": AutoModelForCausalLM.from_pretrained(final / "merged"),
              "agentopd": load_pretrained(str(final))[0], "base": AutoModelForCausalLM.from_pretrained(tmp_path / "base")}
    with torch.no_grad():
        logits = {k: m(input_ids=ids).logits for k, m in models.items()}
    torch.testing.assert_close(logits["merged"], logits["peft"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits["agentopd"], logits["peft"], atol=1e-5, rtol=0)
    assert (logits["base"] - logits["peft"]).abs().max() > 1e-3  # the adapter did move
    base = models["base"].state_dict()
    assert all(torch.equal(v, base[k]) for k, v in _fresh().items())  # the base is the untouched tiny model
    teacher = load_file(tmp_path / "checkpoints" / "step-2" / "trainer_state" / "teacher.safetensors")
    assert teacher and all("lora_" in k for k in teacher)  # the teacher holds the adapter, not the base


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


def test_estimator_arguments_are_checked_before_any_work(tmp_path):
    from agentopd.config import ConfigError

    with pytest.raises(ConfigError, match="grpo does not take \\['clamp', 'center'\\]"):
        train(_cfg(tmp_path, "algo.advantage=grpo"))
    with pytest.raises(ConfigError, match="unknown estimator 'gpro'"):
        train(_cfg(tmp_path, "algo.advantage=gpro"))


@pytest.mark.parametrize("topk", [0, 5])
def test_distillation_loss_alone_moves_the_model(tmp_path, topk):
    # grpo on a batch that is never rewarded has zero advantages: any change comes from distillation
    rows = train(_cfg(tmp_path, "run.steps=2", "algo.advantage=grpo", "algo.advantage_kwargs={}",
                      "algo.distill_weight=1.0", f"algo.distill_topk={topk}", "teacher.mode=frozen"))
    assert all(r["adv_mean"] == 0.0 and r["distill_loss"] > 0 and r["grad_norm"] > 0 for r in rows)
    from agentopd.testbed.tiny import build_tiny

    fresh = build_tiny(seed=0)[0].state_dict()
    trained = _params(tmp_path)
    assert any(not torch.equal(fresh[k], trained[k]) for k in trained)


# ---------------------------------------------------------------- logits chunk by chunk


def _fresh():
    from agentopd.testbed.tiny import build_tiny

    return build_tiny(seed=0)[0].state_dict()


@pytest.mark.parametrize("setting", [[], ["model.lora_rank=4", "model.gradient_checkpointing=true",
                                          "teacher.mode=trust_region"]], ids=["full", "lora-gc-trust_region"])
def test_full_vocab_distillation_from_hidden_chunks_matches_full_logits(tmp_path, setting):
    # optim.logits_chunk=0 is the reference: one [B, R, V] logits tensor per micro-batch
    common = ["run.steps=2", "algo.distill_weight=1.0", "algo.distill_topk=0", *setting]
    chunked = train(_cfg(tmp_path / "chunked", *common, "optim.logits_chunk=5"))
    full = train(_cfg(tmp_path / "full", *common, "optim.logits_chunk=0"))
    for a, b in zip(chunked, full):
        assert a["distill_loss"] > 0
        for k in ("loss", "distill_loss", "kl_teacher"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    a, b, fresh = _params(tmp_path / "chunked"), _params(tmp_path / "full"), _fresh()
    if setting:  # LoRA's B starts at 0: it moved, so the gradient went through the checkpointed layers
        assert all(a[k].abs().sum() > 0 for k in a if "lora_B" in k) and any("lora_B" in k for k in a)
    else:
        assert any(not torch.equal(a[k], fresh[k]) for k in a)
    for k in a:  # the updates agree in norm (AdamW moves a weight whose gradient is ~0 by ~lr, either way);
        # the start: the fresh model's weight, or 0 (LoRA's B; for LoRA's A and frozen weights, a weaker check)
        moved = a[k] - fresh.get(k, torch.zeros_like(a[k]))
        assert (a[k] - b[k]).norm() <= 1e-2 * moved.norm() + 1e-9, k


class LogitsPositions(TorchDispatchMode):
    """The most positions any float32 tensor ending in the vocabulary dimension holds (numel / V)."""

    def __init__(self, V):
        super().__init__()
        self.V, self.most = V, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.dim() > 1 and x.shape[-1] == self.V:
                self.most = max(self.most, x.numel() // self.V)
        return out


class Lengths(HFEngine):
    lengths: ClassVar[list] = []

    def generate(self, *a, **kw):
        out = super().generate(*a, **kw)
        Lengths.lengths += [len(g.response_ids) for gs in out for g in gs]
        return out


@pytest.mark.parametrize("chunk", [8, 0])
def test_full_vocab_distillation_never_holds_B_R_V_logits(tmp_path, chunk):
    from agentopd.testbed.tiny import build_tokenizer

    V, H, B = len(build_tokenizer()), 64, 6  # the tiny model; one micro-batch of all 6 samples
    Lengths.lengths = []
    with LogitsPositions(V) as seen:
        train(_cfg(tmp_path, "run.steps=1", "sampling.max_new_tokens=24", f"optim.micro_batch={B}",
                   "algo.distill_weight=1.0", "algo.distill_topk=0", "teacher.mode=frozen",
                   f"optim.logits_chunk={chunk}"), engine=Lengths)
    R = max(Lengths.lengths)
    assert B * R > H  # the lm-head weight ([H, V] transposed) stays below B * R positions
    if chunk:  # a chunk of logits, or the transposed head weight; never B * R * V elements
        assert seen.most <= max(chunk, H) < B * R
    else:  # the check does see the [B, R, V] logits of the reference path
        assert seen.most >= B * R


# ---------------------------------------------------------------- bf16 autocast


class Dtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm", "_log_softmax") and isinstance(out, torch.Tensor):
            self.seen.setdefault(name, set()).add(out.dtype)
        return out


def test_bf16_autocast_runs_a_step_with_float32_loss_math(tmp_path):
    common = ["run.steps=1", "algo.distill_weight=1.0", "algo.distill_topk=0"]
    cfg = _cfg(tmp_path / "bf16", *common, "run.precision=bf16")
    with Dtypes() as bf16:
        rows = train(cfg)
    train(_cfg(tmp_path / "off", *common, "run.precision=off"))
    assert math.isfinite(rows[0]["loss"]) and math.isfinite(rows[0]["grad_norm"]) and rows[0]["distill_loss"] > 0
    assert torch.bfloat16 in bf16.seen["mm"] | bf16.seen.get("addmm", set())  # the forward passes ran in bf16
    assert bf16.seen["_log_softmax"] == {torch.float32}  # the log-softmax never did
    a, b = _params(tmp_path / "bf16"), _params(tmp_path / "off")
    assert all(torch.isfinite(v).all() for v in a.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)
    for k in a:  # one AdamW step moves a weight by about lr, one way or the other
        torch.testing.assert_close(a[k], b[k], atol=2.5 * cfg.optim.lr, rtol=0, msg=k)


class AutocastSeen(HFEngine):
    seen: ClassVar[list] = []

    def generate(self, *a, **kw):
        AutocastSeen.seen.append(torch.is_autocast_enabled("cpu"))
        return super().generate(*a, **kw)


@pytest.mark.parametrize("precision", ["bf16", "off"])
def test_rollouts_sample_under_the_same_autocast_as_evaluation(tmp_path, precision):
    AutocastSeen.seen = []
    train(_cfg(tmp_path, "run.steps=1", f"run.precision={precision}", "eval.problems=2", "eval.samples=1"),
          engine=AutocastSeen)
    assert AutocastSeen.seen == [precision == "bf16"] * 3  # held-out before, the rollout, held-out after


def test_a_bf16_checkpoint_trains_as_float32_master_weights(tmp_path):
    from safetensors.torch import load_file

    from agentopd.rl.models import load_model
    from agentopd.testbed.tiny import build_tiny

    model, tok = build_tiny()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tok.save_pretrained(tmp_path / "bf16")
    start = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in start.values())
    cfg = _cfg(tmp_path / "run", "run.steps=2", f"model.path={tmp_path / 'bf16'}", "optim.lr=1e-6", "algo.ref_kl=0.1")
    assert all(p.dtype == torch.float32 for p in load_model(cfg.model, cfg.run, torch.device("cpu"))[0].parameters())
    train(cfg)
    after = _params(tmp_path / "run")
    teacher = load_file(tmp_path / "run" / "checkpoints" / "step-2" / "trainer_state" / "teacher.safetensors")
    for k, v in after.items():  # moved by ~lr per step: far below bf16's spacing, kept in float32
        assert v.dtype == teacher[k].dtype == torch.float32, k
        moved = (v - start[k].float()).abs().max()
        assert 0 < moved < 5e-6, (k, moved)
    assert any(not torch.equal(teacher[k], start[k].float()) for k in teacher)  # the EMA's tau * 1e-6 steps too


def test_precision_auto_is_off_on_cpu_and_bad_values_are_refused(tmp_path):  # off: see the bf16 test
    from agentopd.config import ConfigError
    from agentopd.rl.models import autocast

    cpu = torch.device("cpu")
    for precision, on in [("auto", False), ("off", False), ("bf16", True)]:
        with autocast(precision, cpu)():
            assert torch.is_autocast_enabled("cpu") == on, precision
    with pytest.raises(ConfigError, match="run.precision: input should be 'auto', 'bf16' or 'off' \\(got 'fp8'\\)"):
        train(_cfg(tmp_path, "run.precision=fp8"))
    with pytest.raises(ConfigError, match="run.precision: True"):
        train(_cfg(tmp_path, "run.precision=on"))


# ---------------------------------------------------------------- judging overlaps generation


class PerPrompt(HFEngine):
    """Samples each prompt on its own with a seed of its own ids, so that the samples do not depend
    on how prompts are chunked; logs its calls, and from the second call of a step on, first waits
    (up to a minute) for the judging of the call before to start."""

    log: ClassVar[list] = []
    judging: ClassVar[dict] = {}

    def generate(self, prompt_ids, n=1, seed=None, **kw):
        k = sum(1 for e in self.log if e[0] == "generate")
        PerPrompt.log.append(("generate", k, seed))
        if k and k - 1 in PerPrompt.judging:
            PerPrompt.judging[k - 1].wait(timeout=60)
        out = [super(PerPrompt, self).generate([p], n=n, seed=zlib.crc32(str(p).encode()), **kw)[0]
               for p in prompt_ids]
        PerPrompt.log.append(("generated", k))
        return out


class LoggingJudge(MathJudge):
    def judge_many(self, pairs, progress=None):
        k = sum(1 for e in PerPrompt.log if e[0] == "judge")
        PerPrompt.log.append(("judge", k, [text for _, text in pairs]))
        PerPrompt.judging.setdefault(k, threading.Event()).set()
        out = super().judge_many(pairs, progress)
        PerPrompt.log.append(("judged", k, [j.verdict.score for j in out]))
        return out


def _logged_run(tmp_path, *overrides):
    PerPrompt.log, PerPrompt.judging = [], {k: threading.Event() for k in range(8)}
    rows = train(_cfg(tmp_path, "run.steps=2", *overrides), engine=PerPrompt, judge=LoggingJudge(workers=1))
    return rows, PerPrompt.log


def test_chunks_are_judged_while_the_next_chunk_generates_with_the_same_results(tmp_path):
    rows, log = _logged_run(tmp_path / "chunked", "sampling.generate_chunk=1")  # 2 prompts: 2 chunks a step
    # judging chunk 0 started before chunk 1 had finished generating (chunk 1 waits for it)
    assert log.index(("generated", 1)) > next(i for i, e in enumerate(log) if e[:2] == ("judge", 0))
    assert all(r["time_execute"] >= 0 and r["time_execute_total"] > 0 for r in rows)
    serial_rows, serial_log = _logged_run(tmp_path / "serial")

    def texts_scores(log):
        return ([t for e in log if e[0] == "judge" for t in e[2]], [s for e in log if e[0] == "judged" for s in e[2]])

    assert texts_scores(log) == texts_scores(serial_log)  # same samples, same order, same rewards
    assert [r["reward_mean"] for r in rows] == [r["reward_mean"] for r in serial_rows]
    a, b = _params(tmp_path / "chunked"), _params(tmp_path / "serial")
    assert all(torch.equal(a[k], b[k]) for k in a)
    seeds = [e[2] for e in log if e[0] == "generate"]
    assert seeds[::2] == [e[2] for e in serial_log if e[0] == "generate"]  # chunk 0 keeps the step's seed
    assert len(set(seeds)) == len(seeds) == 4  # each chunk of each step its own


# ---------------------------------------------------------------- wandb


def test_wandb_missing_is_a_clear_config_error(tmp_path):
    import importlib.util

    from agentopd.config import ConfigError

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    with pytest.raises(ConfigError, match="run.wandb needs the wandb package: pip install wandb"):
        train(_cfg(tmp_path, "run.wandb=agentopd-test"))


# ---------------------------------------------------------------- objectives (algo.loss)


def test_sdpo_has_no_policy_gradient_term(tmp_path):
    # the same rollouts under two advantage estimators: the sdpo objective ignores advantages entirely
    common = ["run.steps=2", "algo.loss=sdpo", "algo.distill_topk=5", "teacher.mode=frozen"]
    a = train(_cfg(tmp_path / "a", *common, "algo.advantage=grpo", "algo.advantage_kwargs={}"))
    b = train(_cfg(tmp_path / "b", *common))
    assert all(r["distill_loss"] > 0 and "pg_loss" not in r and r["grad_norm"] > 0 for r in a)
    assert all(r["is_mean"] == pytest.approx(1.0, abs=1e-4) for r in a)  # one epoch: on-policy, ratio 1
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)  # the estimator changes nothing
    pa, pb, fresh = _params(tmp_path / "a"), _params(tmp_path / "b"), _fresh()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], fresh[k]) for k in pa)


def test_objective_options_are_checked_before_any_work(tmp_path):
    from agentopd.config import ConfigError

    with pytest.raises(ConfigError, match="unknown objective 'spdo'"):
        train(_cfg(tmp_path, "algo.loss=spdo"))
    with pytest.raises(ConfigError, match="sdpo_token is reverse KL only"):  # as TRL: alpha 1 only
        train(_cfg(tmp_path, "algo.loss=sdpo_token", "algo.distill_alpha=0.5"))
    with pytest.raises(ConfigError, match="mix needs algo.distill_weight in \\[0, 1\\]"):
        train(_cfg(tmp_path, "algo.loss=mix", "algo.distill_weight=1.5"))


class Shifted(HFEngine):
    """The real engine, reporting every sampling log-prob 2 nats lower than it was."""

    def generate(self, *a, **kw):
        out = super().generate(*a, **kw)
        for gs in out:
            for g in gs:
                g.logprobs = [x - 2.0 for x in g.logprobs]
        return out


@pytest.mark.parametrize("loss", ["sdpo", "pg"])
def test_rollout_correction_weighs_every_token_and_is_logged(tmp_path, loss):
    common = ["run.steps=1", f"algo.loss={loss}", "algo.distill_topk=0", "teacher.mode=frozen",
              "algo.advantage=sd_token", "algo.advantage_kwargs={}"]
    exact = train(_cfg(tmp_path / "exact", *common))[0]
    assert exact["rollout_logprob_diff"] < 1e-4 and exact["rollout_is_clipfrac"] == 0.0
    on = train(_cfg(tmp_path / "on", *common), engine=Shifted)[0]
    off = train(_cfg(tmp_path / "off", *common, "algo.rollout_is_clip=0"), engine=Shifted)[0]
    assert on["rollout_logprob_diff"] == pytest.approx(2.0, abs=1e-4) == off["rollout_logprob_diff"]
    assert on["rollout_is_clipfrac"] == 1.0 and on["rollout_is_mean"] == pytest.approx(2.0)  # exp(2) clipped at 2
    assert off["rollout_is_clipfrac"] == 0.0 and off["rollout_is_mean"] == 1.0
    assert abs(off["loss"]) > 1e-6 and on["loss"] == pytest.approx(2 * off["loss"], rel=1e-5)
    assert off["loss"] == pytest.approx(exact["loss"], rel=1e-5)  # off: the engine's numbers do not matter


def test_learner_log_probs_use_the_sampling_temperature(tmp_path):
    # at T = 0.5 the learner's log-probs match the engine's only if it divides its logits by T
    common = ["run.steps=1", "sampling.temperature=0.5", "algo.loss=sdpo", "algo.distill_topk=0", "teacher.mode=frozen"]
    chunked = train(_cfg(tmp_path / "chunked", *common, "optim.logits_chunk=5"))[0]
    full = train(_cfg(tmp_path / "full", *common, "optim.logits_chunk=0"))[0]
    for r in (chunked, full):
        assert r["rollout_logprob_diff"] < 1e-4 and r["distill_loss"] > 0
    for k in ("loss", "kl_teacher"):
        assert chunked[k] == pytest.approx(full[k], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("name", ["micro-sdpo-ref.yaml", "micro-sdpo-token.yaml", "micro-mix.yaml"])
def test_new_objective_configs_train_two_steps_on_the_tiny_model(tmp_path, name):
    cfg = load(str(ROOT / "configs" / name),
               [f"run.out={tmp_path}", "run.progress=false", "model.path=tiny", "env.id=agentopd/Math-v0", "env.kwargs.problems=arithmetic",
                "env.kwargs.levels=[1,2]", "eval.problems=0", "sampling.prompts_per_step=2", "sampling.group_size=3",
                "sampling.max_new_tokens=12", "run.steps=2"])
    rows = train(cfg)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "grad_norm", "distill_loss", "is_mean",
                                                 "rollout_logprob_diff", "rollout_is_mean", "rollout_is_clipfrac"))
        assert r["grad_norm"] > 0 and r["rollout_logprob_diff"] < 1e-4
        assert ("pg_loss" in r) == (cfg.algo.loss == "mix")
    trained, fresh = _params(tmp_path), _fresh()
    assert any(not torch.equal(fresh[k], trained[k]) for k in trained)


def test_heldout_pass1_leaves_judge_errors_out(capsys):
    """An outage of the judge is not a collapse of the model: judge errors are not failures."""
    import math as _math

    from agentopd.judges.base import judge_error

    from agentopd.config import SamplingConfig
    from agentopd.eval.heldout import heldout_pass1
    from agentopd.types import Generation, Judgement, Problem, Verdict

    class Tok:
        def apply_chat_template(self, messages, **kw):
            return {"input_ids": [1, 2, 3]}

    class Engine:
        def generate(self, prompts, n, **kw):
            return [[Generation([7], [-0.1], t, "stop") for t in ("ok", "down", "down", "wrong")[:n]] for _ in prompts]

    class Judge:
        def __init__(self, outage):
            self.outage = outage

        def judge_many(self, pairs):
            return [judge_error("server down") if t == "down" or self.outage else
                    Judgement(Verdict(float(t == "ok"), int(t == "ok"), 1, "ok" if t == "ok" else "wrong_answer"))
                    for _, t in pairs]

    probs = [Problem("a", "q", "math", {"answer": "1"}), Problem("b", "q", "math", {"answer": "1"})]
    p1 = heldout_pass1(Engine(), Tok(), probs, Judge(False), 4, SamplingConfig(), 0)
    assert p1 == 0.5  # 2 of the 4 judged samples, not 2 of 8
    assert "4 of 8 samples could not be judged" in capsys.readouterr().err
    assert _math.isnan(heldout_pass1(Engine(), Tok(), probs, Judge(True), 4, SamplingConfig(), 0))


def test_resume_cuts_metrics_and_samples_back_to_the_checkpoint(tmp_path):
    """A crash after step 3 (the step-4 row written, its checkpoint not): the resumed run's files
    hold each step once, as an uninterrupted run's do."""
    import shutil

    common = ["run.steps=4", "run.checkpoint_every=2", "run.samples_every=1", "run.samples_per_step=2"]
    train(_cfg(tmp_path / "a", *common))
    train(_cfg(tmp_path / "b", *common))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-4")
    shutil.rmtree(tmp_path / "b" / "final")
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a torn last line
    with pytest.warns(UserWarning, match="unreadable line"):
        rows = train(_cfg(tmp_path / "b", *common, "run.resume=true"))
    assert [r["step"] for r in rows] == [3, 4]

    def read(run, name):
        return [json.loads(x) for x in (tmp_path / run / name).read_text().splitlines()]

    a, b = read("a", "metrics.jsonl"), read("b", "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("reward_mean", "loss", "kl_teacher", "response_len", "grad_norm"):
            assert ra[k] == rb[k], (ra["step"], k)
    sa, sb = read("a", "samples.jsonl"), read("b", "samples.jsonl")
    assert [r["step"] for r in sb] == [r["step"] for r in sa] and sorted({r["step"] for r in sb}) == [1, 2, 3, 4]
    assert [r["tokens"] for r in sb] == [r["tokens"] for r in sa]


class EveryOtherDown(BaseJudge):
    """The math judge, except that every other sample of a batch finds the judge down."""

    def __init__(self):
        self.math = MathJudge(workers=1)

    def judge_many(self, pairs, progress=None):
        out = self.math.judge_many(pairs)
        return [judge_error("the judge is down") if k % 2 == 0 else j for k, j in enumerate(out)]

    def close(self):
        self.math.close()


def test_heldout_judge_errors_are_in_the_metrics_row(tmp_path, capsys):
    rows = train(_cfg(tmp_path, "run.steps=1", "eval.problems=2", "eval.samples=2"), judge=EveryOtherDown())
    evals = [r for r in rows if "heldout_pass1" in r]
    assert [r["step"] for r in evals] == [0, 1]
    assert all(r["heldout_judge_errors"] == 2 for r in evals)  # 2 of the 2 x 2 held-out samples
    assert "2 of 4 samples could not be judged" in capsys.readouterr().err
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("heldout_judge_errors") for r in logged] == [2, 2]


def test_a_bad_problems_file_fails_before_the_model_loads(tmp_path):
    from agentopd.envs.data import DataError

    bad = tmp_path / "problems.jsonl"
    bad.write_text('{"prompt": "1+1?", "answer": "2"}\n{not json\n')
    missing = tmp_path / "no-such-model"
    with pytest.raises(DataError, match=r"problems.jsonl:2: not valid JSON") as e:
        train(_cfg(tmp_path / "run", f"env.kwargs.problems={bad}", f"model.path={missing}"))
    assert "no-such-model" not in str(e.value)
    with pytest.raises(DataError, match=r"held.jsonl: no such file"):
        train(_cfg(tmp_path / "run", "env.kwargs.problems=arithmetic", f"env.heldout_kwargs.problems={tmp_path / 'held.jsonl'}",
                   "eval.problems=2", f"model.path={missing}"))


# ------------------------------------------------- TensorBoard and wandb on resume


class _FakeTB:
    """``torch.utils.tensorboard`` as far as train uses it, with TensorBoard's rule for
    ``purge_step``: a writer opened with it hides the events at that step and after."""
    events: list = []  # (tag, value, step), what TensorBoard would show
    opened: list = []  # purge_step of each writer

    class SummaryWriter:
        def __init__(self, logdir, purge_step=None):
            _FakeTB.opened.append(purge_step)
            if purge_step is not None:
                _FakeTB.events[:] = [e for e in _FakeTB.events if e[2] < purge_step]

        def add_scalar(self, tag, value, step):
            _FakeTB.events.append((tag, value, step))

        def close(self):
            pass


class _FakeWandb:
    """``wandb`` as far as train uses it, with wandb's rules: ``init(id=, resume="allow")`` goes on
    with that run; a step below the run's last one is an error here (wandb drops it with a warning)."""
    runs: dict = {}  # id -> [(step, row)]
    inits: list = []

    class Run:
        def __init__(self, rows):
            self.rows = rows

        def log(self, row, step):
            assert not self.rows or step > self.rows[-1][0], f"step {step} after {self.rows[-1][0]}"
            self.rows.append((step, dict(row)))

        def finish(self):
            pass

    @staticmethod
    def init(project, config, dir, id, resume):
        _FakeWandb.inits.append((id, resume))
        return _FakeWandb.Run(_FakeWandb.runs.setdefault(id, []))


def test_resume_logs_each_step_once_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    """A crash after step 4's row (its checkpoint lost): the resumed run's TensorBoard purges from
    step 3 on (the steps it redoes), wandb goes on with the same run and logs the steps after its
    last one; each shows steps 1-4 once."""
    import shutil

    import agentopd.train as train_module

    fakes = {"torch.utils.tensorboard": _FakeTB, "wandb": _FakeWandb}  # (not in sys.modules: others look there)
    monkeypatch.setattr(train_module, "_needs", lambda module, option, package: fakes[module])
    common = ["run.steps=4", "run.checkpoint_every=2", "run.tensorboard=true", "run.wandb=agentopd-test"]
    train(_cfg(tmp_path, *common))
    shutil.rmtree(tmp_path / "checkpoints" / "step-4")
    shutil.rmtree(tmp_path / "final")
    rows = train(_cfg(tmp_path, *common, "run.resume=true"))
    assert [r["step"] for r in rows] == [3, 4]
    assert _FakeTB.opened == [None, 3]
    assert sorted(s for tag, _, s in _FakeTB.events if tag == "loss") == [1, 2, 3, 4]
    (id1, _), (id2, resume) = _FakeWandb.inits
    assert id1 == id2 and resume == "allow"
    assert [s for s, _ in _FakeWandb.runs[id1]] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "wandb.json").read_text()) == {"id": id1, "step": 4}


def test_resume_purges_the_redone_steps_in_real_tensorboard_events(tmp_path):
    """The same with TensorBoard itself: its event reader shows each step once."""
    import shutil

    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["run.steps=4", "run.checkpoint_every=2", "run.tensorboard=true"]
    train(_cfg(tmp_path, *common))
    shutil.rmtree(tmp_path / "checkpoints" / "step-4")
    shutil.rmtree(tmp_path / "final")
    train(_cfg(tmp_path, *common, "run.resume=true"))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]


@pytest.mark.parametrize("setting", [
    ["algo.loss=sdpo_token", "algo.distill_alpha=1.0"],
    ["algo.loss=sdpo", "algo.distill_topk=0"],
    ["algo.loss=pg", "algo.advantage=grpo"],
    ["algo.loss=pg", "algo.advantage=sd_token", "optim.micro_batch=4", "env.max_turns=2"],
    ["algo.loss=pg", "algo.advantage=sd_token", "optim.epochs_per_batch=2", "optim.micro_batch=4"],
])
def test_old_logprobs_from_the_update_forward_train_as_the_scoring_forward(tmp_path, setting):
    # without the student's scoring forward (the update's own first-epoch log-probs, detached) the same
    # parameters after 2 steps, and the same metrics, as with it (optim.score_old: the separate forward)
    from agentopd.rl.learner import old_from_update

    common = ["run.steps=2", "run.checkpoint_every=2", "optim.lr=0.001", "algo.advantage_kwargs={}", *setting]
    fused_cfg = _cfg(tmp_path / "fused", *common)
    scored_cfg = _cfg(tmp_path / "x", *common, "optim.score_old=true")
    assert old_from_update(fused_cfg.algo, fused_cfg.optim, _fresh_model()) and not old_from_update(
        scored_cfg.algo, scored_cfg.optim, _fresh_model())
    fused = train(fused_cfg, judge=ParityJudge())
    scored = train(_cfg(tmp_path / "scored", *common, "optim.score_old=true"), judge=ParityJudge())
    a, b = _params(tmp_path / "fused"), _params(tmp_path / "scored")
    fresh = _fresh()
    assert any(not torch.equal(fresh[k], a[k]) for k in a)  # it trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    for r, s in zip(fused, scored):
        for k in ("loss", "kl_teacher", "adv_mean", "adv_std", "rollout_logprob_diff", "rollout_is_mean",
                  "rollout_is_clipfrac", "teacher_auc", "ratio_correct", "ratio_wrong", "grad_norm"):
            assert (r[k] is None and s[k] is None) or r[k] == pytest.approx(s[k], rel=1e-4, abs=1e-6), k


class ParityJudge(BaseJudge):
    """Reward 1 for responses whose CRC is odd (about half: every group has both kinds), a critique otherwise."""

    workers = 1

    def judge(self, problem, response):
        r = float(zlib.crc32(response.encode()) % 2)
        return Judgement(Verdict(r, int(r), 1, "ok" if r else "wrong_answer"), "" if r else "Wrong: try again.")

    def judge_many(self, pairs, progress=None):
        return [self.judge(p, text) for p, text in pairs]


def _fresh_model():
    from agentopd.testbed.tiny import build_tiny

    return build_tiny(seed=0)[0]


def test_the_scoring_forward_stays_where_advantages_need_the_whole_batch(tmp_path):
    from agentopd.rl.learner import old_from_update

    model = _fresh_model()
    for adv, kw in [("sd_token", "{center: true}"), ("sd_to_go", "{}"), ("hybrid", "{}")]:
        cfg = _cfg(tmp_path, f"algo.advantage={adv}", f"algo.advantage_kwargs={kw}")
        assert not old_from_update(cfg.algo, cfg.optim, model), adv
    model.config.attention_dropout = 0.1  # a train-mode forward differs from the sampler's
    cfg = _cfg(tmp_path, "algo.advantage=grpo")
    assert not old_from_update(cfg.algo, cfg.optim, model)


def test_grpo_without_a_scoring_forward_runs_none(tmp_path, monkeypatch):
    from agentopd.rl import learner

    calls = []
    real = learner.sequence_logprobs
    monkeypatch.setattr(learner, "sequence_logprobs", lambda m, p, r, **kw: calls.append(len(p)) or real(m, p, r, **kw))
    common = ["run.steps=1", "algo.loss=pg", "algo.advantage=grpo", "algo.advantage_kwargs={}"]
    train(_cfg(tmp_path / "fused", *common), judge=ParityJudge())
    assert calls == []  # no teacher, no reference: nothing is scored before the update
    train(_cfg(tmp_path / "scored", *common, "optim.score_old=true"), judge=ParityJudge())
    assert calls == [6]  # the student, all 6 rows in one forward


def test_rows_without_a_teacher_signal_skip_the_backward_of_a_distillation_loss(tmp_path, monkeypatch):
    # sdpo_token weighs only the teacher-signal tokens: leaving the other rows out of the backward
    # (their old log-probs still from a no-grad forward) gives the same parameters and metrics
    from agentopd.rl import objectives

    common = ["run.steps=2", "run.checkpoint_every=2", "optim.lr=0.001", "algo.loss=sdpo_token", "algo.distill_alpha=1.0",
              "algo.advantage_kwargs={}"]
    skipped = train(_cfg(tmp_path / "skipped", *common), judge=ParityJudge())
    assert any(r["teacher_signal_frac"] < 1 for r in skipped)
    monkeypatch.setattr(objectives, "TEACHER_ROWS_ONLY", frozenset())
    whole = train(_cfg(tmp_path / "whole", *common), judge=ParityJudge())
    a, b = _params(tmp_path / "skipped"), _params(tmp_path / "whole")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    for r, s in zip(skipped, whole):
        for k in ("loss", "is_mean", "kl_teacher", "rollout_logprob_diff", "rollout_is_mean", "grad_norm"):
            assert r[k] == pytest.approx(s[k], rel=1e-4, abs=1e-6), k


def test_shared_prompt_forwards_train_as_the_plain_forwards(tmp_path):
    # optim.share_prompts (a group's prompt forwarded once, the responses on its repeated KV cache, in
    # the teacher's and the student's forwards): the parameters and metrics of every row's own forward
    # after 2 steps, up to float rounding
    common = ["run.steps=2", "run.checkpoint_every=2", "optim.lr=0.001", "algo.advantage_kwargs={}",
              "algo.loss=sdpo_token", "algo.distill_alpha=1.0"]
    shared = train(_cfg(tmp_path / "shared", *common), judge=ParityJudge())
    plain = train(_cfg(tmp_path / "plain", *common, "optim.share_prompts=false"), judge=ParityJudge())
    a, b = _params(tmp_path / "shared"), _params(tmp_path / "plain")
    assert any(not torch.equal(_fresh()[k], a[k]) for k in a)  # it trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    for r, s in zip(shared, plain):
        for k in ("loss", "kl_teacher", "rollout_logprob_diff", "teacher_signal_frac", "grad_norm"):
            assert (r[k] is None and s[k] is None) or r[k] == pytest.approx(s[k], rel=1e-3, abs=1e-5), k


@pytest.mark.parametrize("share", ["true", "false"])
def test_the_grpo_update_steps_on_the_policy_gradient_of_group_normalised_rewards(tmp_path, monkeypatch, share):
    # the gradient the optimizer steps on is -(1/N) sum_i A_i sum_t grad log p(y_it | x_i): N the batch's
    # response tokens, A_i = (R_i - mean_g R) / (std_g R + 1e-6) formed here by hand from the judged
    # rewards, log p from one plain full-logits forward per row (no estimator, logit chunks, shared
    # prompt or fused old-log-prob path in between); row i's whole response, end token included
    import agentopd.train as T

    seen = {}
    real_inputs, real_update = T.make_batch, T.update

    def make_batch(algo, rows, *a):
        seen["rewards"], seen["groups"] = list(rows.rewards), list(rows.groups)
        return real_inputs(algo, rows, *a)

    def update(algo, optim, temperature, model, opt, teacher, head_VH, chunk, amp, st):
        real_step = opt.step

        def step(*a, **kw):
            params = [p for p in model.parameters() if p.grad is not None]
            seen["got"] = torch.cat([p.grad.flatten() for p in params])
            r = torch.tensor(seen["rewards"])
            g = torch.tensor(seen["groups"])
            adv = torch.zeros_like(r)
            for k in g.unique():
                m = g == k
                adv[m] = (r[m] - r[m].mean()) / (r[m].std(unbiased=False) + 1e-6)
            n_tok = sum(len(x) for x in st.response_ids)
            total = 0.0
            for a_i, p, y in zip(adv.tolist(), st.prompt_ids, st.response_ids):
                logp = model(input_ids=torch.tensor([p + y])).logits[0, len(p) - 1:-1].float().log_softmax(-1)
                total = total - a_i * logp.gather(-1, torch.tensor(y)[:, None]).sum() / n_tok
            seen["want"] = torch.cat([x.flatten() for x in torch.autograd.grad(total, params)])
            return real_step(*a, **kw)

        opt.step = step
        return real_update(algo, optim, temperature, model, opt, teacher, head_VH, chunk, amp, st)

    monkeypatch.setattr(T, "make_batch", make_batch)
    monkeypatch.setattr(T, "update", update)
    train(_cfg(tmp_path, "run.steps=1", "algo.loss=pg", "algo.advantage=grpo", "algo.advantage_kwargs={std_normalize: true}",
               "optim.grad_clip=1e9", "optim.micro_batch=4", f"optim.share_prompts={share}"), judge=ParityJudge())
    assert len(set(seen["rewards"])) == 2 and seen["want"].norm() > 0  # a batch with a learning signal
    assert torch.allclose(seen["got"], seen["want"], rtol=1e-4, atol=1e-7)


def test_the_update_returns_what_it_computes_and_leaves_its_batch_as_it_was(tmp_path, monkeypatch):
    """The batch the update reads is not changed by it (the fused path's old log-probs, advantages and
    rollout correction come back in the Update), and the metrics row reads the returned values."""
    import agentopd.train as T

    seen = {}
    real = T.update

    def update(algo, optim, temperature, model, opt, teacher, head_VH, chunk, amp, batch):
        before = {k: v.clone() for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}
        got = real(algo, optim, temperature, model, opt, teacher, head_VH, chunk, amp, batch)
        seen.update(batch=batch, got=got, same=all(torch.equal(before[k], getattr(batch, k)) for k in before))
        return got

    monkeypatch.setattr(T, "update", update)
    rows = train(_cfg(tmp_path, "run.steps=1", "algo.advantage_kwargs={}"), judge=ParityJudge())
    batch, got = seen["batch"], seen["got"]
    assert seen["same"] and batch.old_BT is None and batch.adv_BT is None  # left to the update's first forward
    m = batch.mask_BT.bool()
    assert torch.isfinite(got.old_BT[m]).all() and (got.old_BT[m] < 0).all() and got.adv_BT[m].abs().sum() > 0
    assert rows[0]["adv_mean"] == pytest.approx(float(got.adv_BT[m].mean()))
    assert rows[0]["rollout_logprob_diff"] == pytest.approx(got.rollout_metrics["rollout_logprob_diff"])

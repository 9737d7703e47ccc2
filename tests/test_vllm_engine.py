"""The ``vllm`` engine's logic without vLLM (tests/fake_vllm.py stands in for ``vllm.LLM``): learner
names mapped to the base model's (plain and peft LoRA, merged without touching the learner), a
2-step ``train`` run with ``engine.name: vllm`` that syncs exactly once per optimizer step and
never inside ``generate`` (its time in ``time_sync``), vLLM asleep during the update and woken
weights first, the memory budget naming its knob, and one line for a missing or too old vLLM."""
import copy
import json
import os
import sys
from pathlib import Path

import fake_vllm
import pytest
import torch

from agentopd.config import ConfigError, load
from agentopd.inference.vllm import (
    VLLMEngine,
    gpu_budget,
    memory_budget,
    vllm_name,
    vllm_weights,
)
from agentopd.testbed.tiny import build_tiny
from agentopd.train import train

ROOT = Path(__file__).resolve().parents[1]


def _lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # B = 0 at init: make the delta real
        torch.manual_seed(seed)
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return peft


# ---------------------------------------------------------------------------------- names


def test_names_map_to_the_base_models():
    assert vllm_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert vllm_name("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert vllm_name("_orig_mod.lm_head.weight") == "lm_head.weight"
    lora = "base_model.model.model.layers.1.self_attn.q_proj."
    assert vllm_name(lora + "base_layer.weight") == "model.layers.1.self_attn.q_proj.weight"
    assert vllm_name(lora + "base_layer.bias") == "model.layers.1.self_attn.q_proj.bias"
    assert vllm_name(lora + "lora_A.default.weight") is None and vllm_name(lora + "lora_B.default.weight") is None
    assert vllm_name("base_model.model.model.norm.weight") == "model.norm.weight"
    assert vllm_name("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert vllm_name("base_model.model.lm_head.original_module.weight") is None


def test_plain_weights_are_the_parameters_under_their_names():
    model, _ = build_tiny()
    got = dict(vllm_weights(model))
    want = dict(model.named_parameters())
    assert got.keys() == want.keys()
    assert all(got[k] is not want[k] and torch.equal(got[k], want[k]) for k in want)


def test_lora_weights_are_merged_under_base_names_and_the_learner_is_untouched():
    base, _ = build_tiny()
    peft = _lora(copy.deepcopy(base))
    before = {n: p.detach().clone() for n, p in peft.named_parameters()}
    got = dict(vllm_weights(peft))
    want = copy.deepcopy(peft).merge_and_unload().state_dict()
    assert got.keys() == dict(base.named_parameters()).keys()  # exactly the base model's names
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           base.state_dict()["model.layers.0.self_attn.q_proj.weight"])  # the delta is in
    assert not any(m.merged for m in peft.modules() if hasattr(m, "merged") and hasattr(m, "lora_A"))
    assert all(torch.equal(p, before[n]) for n, p in peft.named_parameters())  # bit for bit, adapter unmerged


def test_lora_sync_into_the_fake_gives_the_merged_models_outputs(tmp_path, monkeypatch):
    fake_vllm.install(monkeypatch)
    base, _ = build_tiny(tmp_path)
    peft = _lora(copy.deepcopy(base))
    e = VLLMEngine(str(tmp_path))
    e.load_weights(peft)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(e.llm.hf(x).logits, peft(x).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- sleep, wake, sync


def test_sleep_then_sync_wakes_weights_first_and_generate_never_syncs(tmp_path, monkeypatch):
    fake_vllm.install(monkeypatch)
    model, _ = build_tiny(tmp_path)
    e = VLLMEngine(str(tmp_path), sleep_level=2)
    llm = e.llm
    assert llm.kwargs["enable_sleep_mode"] is True and llm.kwargs["logprobs_mode"] == "processed_logprobs"
    [gs] = e.generate([[5, 6, 7]], n=2, max_new_tokens=4, seed=0)
    assert len(gs) == 2 and all(len(g.logprobs) == len(g.response_ids) > 0 for g in gs)
    assert llm.events == ["generate"]  # no sync inside generate
    e.sleep()
    e.sleep()  # once asleep, a no-op
    with pytest.raises(RuntimeError, match="asleep"):
        e.generate([[5, 6, 7]])
    e.sync(model)
    kinds = [ev[0] if isinstance(ev, tuple) else ev for ev in llm.events]
    n = len(list(model.parameters()))
    assert kinds == ["generate", "sleep", "wake_up", *["load_weights"] * n, "wake_up", "reset_prefix_cache"]
    assert llm.events[1] == ("sleep", 2) and llm.events[2] == ("wake_up", ("weights",))
    assert llm.events[-2] == ("wake_up", ("kv_cache",))
    assert all(torch.equal(a, b) for a, b in zip(llm.hf.parameters(), model.parameters()))  # the NaNs replaced
    e.generate([[5, 6, 7]], max_new_tokens=3)


def test_sleep_level_0_keeps_vllm_awake(tmp_path, monkeypatch):
    fake_vllm.install(monkeypatch)
    model, _ = build_tiny(tmp_path)
    e = VLLMEngine(str(tmp_path))
    e.sleep()
    e.sync(model)
    assert "enable_sleep_mode" not in e.llm.kwargs
    assert not any(isinstance(ev, tuple) and ev[0] in ("sleep", "wake_up") for ev in e.llm.events)


# ------------------------------------------------------------------------- the training loop


def _cfg(tmp_path, *overrides):
    return load(str(ROOT / "configs" / "micro-sdpo.yaml"),
                [f"run.out={tmp_path}", "run.progress=false", "model.path=tiny", "env.id=agentopd/Math-v0",
                 "env.kwargs.problems=arithmetic", "env.kwargs.levels=[1,2]", "eval.problems=0", "sampling.prompts_per_step=2",
                 "sampling.group_size=2", "sampling.max_new_tokens=8", "run.steps=2", "engine.name=vllm",
                 "engine.kwargs={sleep_level: 2}", "optim.lr=0.01", *overrides])


def _syncs(events) -> list[str]:
    """The events with each run of load_weights calls as one 'sync' (and how many parameters)."""
    out = []
    for ev in events:
        if isinstance(ev, tuple) and ev[0] == "load_weights":
            if out and out[-1][0] == "sync":
                out[-1] = ("sync", out[-1][1] + len(ev[1]))
            else:
                out.append(("sync", len(ev[1])))
        else:
            out.append(ev)
    return out


@pytest.mark.parametrize("lora", [0, 4])
def test_train_with_vllm_syncs_once_per_optimizer_step(tmp_path, monkeypatch, lora):
    fake_vllm.install(monkeypatch)
    rows = train(_cfg(tmp_path, f"model.lora_rank={lora}", "run.save_merged=true"))
    [llm] = fake_vllm.LLM.instances
    n = len(dict(llm.hf.named_parameters()))
    step = [("sleep", 2), ("wake_up", ("weights",)), ("sync", n), ("wake_up", ("kv_cache",)), "reset_prefix_cache"]
    got = _syncs(llm.events)
    assert got.count(("sleep", 2)) == 2 and [e for e in got if e[0] == "sync"] == [("sync", n)] * 2
    first = got.index(("sleep", 2))
    assert all(e == "generate" for e in got[:first]) and got[first:first + 5] == step and got[-5:] == step
    assert got[first + 5:-5] and all(e == "generate" for e in got[first + 5:-5])  # step 2's rollouts
    assert all(r["time_sync"] > 0 and "time_generate" in r for r in rows)
    # what vLLM holds after the last sync is the trained model (a LoRA run's: merged)
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final" / ("merged" if lora else ""))
    for (k, a), (k2, b) in zip(llm.hf.named_parameters(), final.named_parameters()):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    base, _ = build_tiny(seed=0)
    assert not torch.equal(dict(llm.hf.named_parameters())["model.norm.weight" if not lora else
                                                             "model.layers.0.self_attn.q_proj.weight"],
                           dict(base.named_parameters())["model.norm.weight" if not lora else
                                                         "model.layers.0.self_attn.q_proj.weight"])
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["time_sync"] > 0


def test_resumed_run_syncs_the_resumed_weights_first(tmp_path, monkeypatch):
    fake_vllm.install(monkeypatch)
    train(_cfg(tmp_path, "run.checkpoint_every=1", "run.steps=1"))
    train(_cfg(tmp_path, "run.resume=true"))
    llm = fake_vllm.LLM.instances[-1]
    got = _syncs(llm.events)
    assert got[0][0] == "sync" and got[1] == "reset_prefix_cache" and got[2] == "generate"  # before any rollout


def test_the_hf_engine_syncs_for_free(tmp_path):
    rows = train(_cfg(tmp_path, "engine.name=hf", "engine.kwargs={}", "engine.batch_size=3", "run.steps=1"))
    assert rows[0]["time_sync"] < 0.01 and rows[0]["time_generate"] > 0  # the hf engine's sync does nothing


def test_a_bad_engine_name_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="engine.name: input should be 'hf', 'vllm' or 'openai'"):
        train(_cfg(tmp_path, "engine.name=bogus"))
    assert not (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------ memory


def test_memory_budget_checks_or_picks_the_share_and_names_the_knob():
    G = 1024 ** 3
    assert memory_budget(80 * G, 60 * G, 10 * G, 8 * G, 0.5) == 0.5
    assert memory_budget(80 * G, 60 * G, 10 * G, 8 * G) == 0.52  # (60 - 10 - 8) / 80 = 0.525, floored
    with pytest.raises(ConfigError) as e:
        memory_budget(80 * G, 60 * G, 10 * G, 8 * G, 0.9)
    msg = str(e.value)
    assert msg.startswith("engine.kwargs.gpu_memory_utilization=0.9 does not fit") and "at most 0.52" in msg
    assert "\n" not in msg and "20.0 GiB" in msg  # what the learner holds now
    with pytest.raises(ConfigError, match=r"engine.kwargs.gpu_memory_utilization: no room for vLLM.*model.lora_rank"):
        memory_budget(80 * G, 20 * G, 10 * G, 8 * G)


def test_gpu_budget_counts_gradients_and_adam_moments_still_to_come(monkeypatch):
    G = 1024 ** 3
    model, _ = build_tiny()
    trainable = sum(p.numel() * 4 for p in model.parameters())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * G + 3 * trainable, 80 * G))
    assert gpu_budget(model, headroom_gb=8) == 0.4  # (40 GiB + 3T free - 3T to come - 8 GiB) / 80 GiB
    with pytest.raises(ConfigError, match="at most 0.40"):
        gpu_budget(model, 0.45, headroom_gb=8)


# ------------------------------------------------------------------- missing or too old


def test_missing_vllm_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError) as e:
        VLLMEngine("some/model")
    assert str(e.value) == "the vllm engine needs vLLM: pip install 'agentopd[vllm]'"


def test_old_vllm_is_one_line_naming_the_version(monkeypatch, tmp_path):
    fake_vllm.install(monkeypatch, version="0.8.5")
    with pytest.raises(ImportError) as e:
        VLLMEngine("some/model")
    assert str(e.value) == "the vllm engine needs vLLM >= 0.10.2, found 0.8.5: pip install -U 'agentopd[vllm]'"
    fake_vllm.install(monkeypatch, version="0.11.1.dev12+g0123abc")
    build_tiny(tmp_path)
    VLLMEngine(str(tmp_path))  # a dev build of a newer version is fine


def test_train_cli_with_an_old_vllm_fails_with_one_line_before_any_work(tmp_path):
    import subprocess

    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "vllm.py").write_text("__version__ = '0.9.0'\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "agentopd.cli", "train", "--config", str(ROOT / "configs" / "micro-sdpo.yaml"),
                        f"run.out={tmp_path / 'run'}", "model.path=tiny", "engine.name=vllm"],
                       check=False, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("agentopd: error: the vllm engine needs vLLM >= 0.10.2, found 0.9.0: "
                                "pip install -U 'agentopd[vllm]'")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_gpu_checks_vllm_stage_runs_the_engines_sleep_and_sync(monkeypatch):
    import importlib.util
    import time

    fake_vllm.install(monkeypatch)
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check, "now", lambda device: time.perf_counter())  # no CUDA to synchronize here
    sizes = gpu_check.SIZES["smoke"]
    model = gpu_check.build_llama(gpu_check.SHAPES["smoke"], torch.device("cpu"))
    out = {}
    gpu_check.bench_vllm_generate(model, sizes, out)
    assert out["tokens"] == sizes["gen_batch"] * sizes["gen_new"] and out["greedy_same_after_sync"] is True
    assert out["sync_s"] > 0 and "sleep_s" in out
    [llm] = fake_vllm.LLM.instances
    assert ("sleep", 2) in llm.events and ("wake_up", ("kv_cache",)) in llm.events

"""The GPU recipes (configs/recipes/) and ``agentopd train --dry-run`` (agentopd/plan.py,
agentopd/memory.py): every recipe dry-runs with its models swapped for tiny local ones and its
problems for real CodeContests samples; each recipe's stated memory is what agentopd.memory
computes; the dry run catches a broken reference and a teacher that cannot be distilled from."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from contests_samples import SAMPLES, TSHIRTS, contests_row, samples
from sandbox_probe import bwrap_or_skip

from agentopd import memory
from agentopd.config import ConfigError, load
from agentopd.plan import dry_run, render

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample data not found at {SAMPLES}")


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> str:
    """Three CodeContests problems: one with a Python 3 reference, two without."""
    bwrap_or_skip(workers=1, warm=False).close()
    if not SAMPLES.is_dir():
        pytest.skip(f"sample data not found at {SAMPLES}")
    rows = samples()
    path = tmp_path_factory.mktemp("cc") / "code_contests.jsonl"
    rows = [contests_row(rows[3], TSHIRTS), contests_row(rows[0], None), contests_row(rows[9], None)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> str:
    """A tiny checkpoint with the tiny student's tokenizer (seed 0) and a wider body."""
    from agentopd.testbed.tiny import build_tiny

    d = tmp_path_factory.mktemp("teacher")
    build_tiny(str(d), hidden=96)
    return str(d)


def ranks_of(path: Path) -> int:
    m = re.search(r"--dry-run --ranks (\d+)", path.read_text())
    return int(m.group(1)) if m else 1


def swapped(path: Path, problems: str, teacher: str) -> list[str]:
    """The overrides that swap a recipe's models and data for local ones (and backend for the test sandbox)."""
    out = ["model.path=tiny", f"env.kwargs.problems={problems}", f"env.heldout_kwargs.problems={problems}",
           "env.kwargs.backend=bwrap"]
    return out + ([f"teacher.model={teacher}"] if load(str(path)).teacher.model else [])


def test_there_are_recipes_for_each_algorithm_lora_and_full_one_and_eight_gpus():
    cfgs = {p.stem: load(str(p)) for p in RECIPES}
    kinds = {(c.algo.loss, c.algo.advantage if c.algo.loss == "pg" else "", bool(c.model.lora_rank), ranks_of(p))
             for p, c in zip(RECIPES, cfgs.values())}
    for algo in (("pg", "grpo"), ("pg", "sd_token"), ("opd", "")):
        assert {(*algo, lora, 1) for lora in (False, True)} <= kinds and (*algo, False, 8) in kinds
    assert all(c.engine.name == "vllm" for c in cfgs.values())
    assert {c.teacher.model for c in cfgs.values() if c.algo.loss == "opd"} == {"Qwen/Qwen2.5-Coder-7B-Instruct"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_states_the_memory_agentopd_memory_computes(path):
    cfg = load(str(path))
    shape = memory.shape_of(memory.known_config(cfg.model.path))
    teacher = memory.shape_of(memory.known_config(cfg.teacher.model)) if cfg.teacher.model else None
    est = memory.estimate(cfg, shape, teacher, 3072, 80 * memory.GiB, ranks_of(path))
    stated = float(re.search(r"peak ([\d.]+) GiB per GPU", path.read_text()).group(1))
    assert stated == pytest.approx(est.peak / memory.GiB, abs=0.006) and stated < 80
    assert est.vllm_share == cfg.engine.kwargs["gpu_memory_utilization"]  # the share fits beside the learner
    if cfg.model.lora_rank:
        assert shape.trainable(cfg.model.lora_rank) < shape.params / 20


@needs_samples
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_dry_runs_with_tiny_models(path, problems, tiny_teacher):
    cfg = load(str(path), swapped(path, problems, tiny_teacher))
    ranks = ranks_of(path)
    plan = dry_run(cfg, ranks)
    refs = plan["references"]["train"]
    assert (refs["problems"], refs["with_reference"], refs["passed"], refs["broken"]) == (3, 1, 1, [])
    assert plan["prompt_tokens"]["measured"] == 3 and plan["prompt_tokens"]["max"] > 100
    s = plan["steps"]
    assert s["rollouts_per_step"] == cfg.sampling.prompts_per_step * cfg.sampling.group_size
    assert s["rollouts_per_rank"] * ranks == s["rollouts_per_step"]
    assert plan["memory"]["vllm_share"] == cfg.engine.kwargs["gpu_memory_utilization"]
    text = render(plan)
    assert ("separate frozen model" if cfg.teacher.model else "self" if "sd" in cfg.algo.advantage else "none") in text
    assert "references (train): 1/1 pass their tests" in text and "peak" in text


@needs_samples
def test_dry_run_of_a_recipe_whose_models_are_not_here(problems):
    """Without the models (nothing is downloaded), their published configs give the memory plan."""
    path = ROOT / "configs" / "recipes" / "coder1.5b-opd7b-lora.yaml"
    plan = dry_run(load(str(path), [f"env.kwargs.problems={problems}", f"env.heldout_kwargs.problems={problems}",
                                    "env.kwargs.backend=bwrap"]))
    assert plan["models"]["Qwen/Qwen2.5-Coder-7B-Instruct"]["params"] == 7_615_616_512
    stated = float(re.search(r"peak ([\d.]+) GiB per GPU", path.read_text()).group(1))
    assert plan["memory"]["peak_gib"] == pytest.approx(stated, abs=0.006)  # the sampling phase: no sequence length in it
    assert any(n.startswith("vocabulary rows: student 151936, teacher 152064") for n in plan["notes"])


@needs_samples
def test_dry_run_from_the_command_line(problems, tiny_teacher):
    path = ROOT / "configs" / "recipes" / "coder1.5b-opd7b-lora.yaml"
    r = subprocess.run([sys.executable, "-m", "agentopd", "train", "--dry-run", "--gpu-gib", "40", "--config", str(path),
                        *swapped(path, problems, tiny_teacher)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr
    assert "dry run: tiny (LoRA r=32), engine vllm, loss opd" in r.stdout
    assert "memory per GPU (40.0 GiB, given" in r.stdout and "gpu_memory_utilization 0.5" in r.stdout
    assert not (ROOT / "runs" / "coder1.5b-opd7b-lora").exists()  # nothing trained, nothing written
    r = subprocess.run([sys.executable, "-m", "agentopd", "train", "--dry-run", "--ranks", "3", "--config", str(path),
                        *swapped(path, problems, tiny_teacher)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, check=False)
    assert r.returncode == 2 and "does not split over 3 ranks" in r.stderr


@needs_samples
def test_dry_run_catches_broken_references_and_teachers_it_cannot_distil_from(problems, tiny_teacher, tmp_path):
    rows = [json.loads(line) for line in Path(problems).read_text().splitlines()]
    rows[1]["solutions"] = {"language": [3], "solution": ["print(0)"]}  # a reference that fails its tests
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = ROOT / "configs" / "recipes" / "coder1.5b-grpo-lora.yaml"
    plan = dry_run(load(str(path), swapped(path, str(broken), tiny_teacher)))
    refs = plan["references"]["train"]
    assert refs["passed"] == 1 and [b["id"] for b in refs["broken"]] == [rows[1]["name"]]
    assert f"BROKEN {rows[1]['name']}: reward tests wrong_answer 0/" in render(plan)

    from agentopd.testbed.tiny import build_tiny

    other = tmp_path / "other-tokenizer"
    build_tiny(str(other), vocab_size=600)
    opd = ROOT / "configs" / "recipes" / "coder1.5b-opd7b-full.yaml"
    with pytest.raises(ConfigError, match="different tokenizers"):
        dry_run(load(str(opd), [*swapped(opd, problems, tiny_teacher), f"teacher.model={other}"]))
    padded = tmp_path / "padded"  # the student's tokenizer, more head rows (as Qwen2.5-Coder-7B's 152,064)
    model, tok = build_tiny(hidden=96)
    model.resize_token_embeddings(len(tok) + 64)
    model.save_pretrained(padded)
    tok.save_pretrained(padded)
    assert dry_run(load(str(opd), [*swapped(opd, problems, str(padded))]))["notes"][0].startswith("vocabulary rows")
    with pytest.raises(ConfigError, match="set algo.distill_topk"):
        dry_run(load(str(opd), [*swapped(opd, problems, str(padded)), "algo.distill_topk=0"]))


def test_opd_recipe_trains_from_a_teacher_with_more_vocabulary_rows(tmp_path):
    """The OPD recipes' case (Qwen2.5-Coder-7B's head has 128 rows more than the 1.5B's): the
    divergence over the student's top-K gathers the teacher's log-probs at the student's ids."""
    from agentopd.testbed.tiny import build_tiny
    from agentopd.train import train

    model, tok = build_tiny(hidden=96)
    model.resize_token_embeddings(len(tok) + 64)
    model.save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    path = ROOT / "configs" / "recipes" / "coder1.5b-opd7b-lora.yaml"
    rows = train(load(str(path), [
        "model.path=tiny", f"teacher.model={tmp_path / 'padded'}", "engine.name=hf", "engine.kwargs={}",
        "env.kwargs.problems=functions", "env.kwargs.n=32", "env.heldout_kwargs={}", "eval.problems=0",
        "sampling.max_new_tokens=16", "sampling.prompts_per_step=2", "sampling.group_size=2", "run.steps=1",
        f"run.out={tmp_path / 'run'}", "run.progress=false", "run.checkpoint_every=0", "run.device=cpu"]))
    assert rows[-1]["loss"] > 0 and rows[-1]["kl_teacher"] != 0

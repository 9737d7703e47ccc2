"""bench/gpu_check.py's --smoke mode on CPU: every stage runs and reports (figures are not asserted)."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_stage(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    stages = ["build", "generate_hf", "ppo_ratio", "agreement", "step_ratio_llama", "learner_full", "learner_full_gc",
              "learner_lora", "learner_lora_gc", "train_loop_tiny", "recipe_coder1.5b-opd7b-lora"]
    assert all(k in r and "error" not in r[k] for k in stages), {k: r.get(k) for k in stages}
    assert r["generate_hf"]["tokens"] == 16 and r["train_loop_tiny"]["sdpo_over_grpo"] > 0
    assert r["generate_hf"]["model_generate_tokens_per_s"] > 0 and r["generate_hf"]["engine_over_model_generate"] > 0
    assert r["ppo_ratio"]["epoch0_vs_rescoring"]["clip_frac"] == 0.0  # a correctness figure even at tiny size
    recipe = r["recipe_coder1.5b-opd7b-lora"]  # the recipe trained 2 steps in its own process, hf engine on the CPU
    assert (recipe["steps"], recipe["engine"], recipe["final"]) == (2, "hf", True) and recipe["loss"][0] > 0

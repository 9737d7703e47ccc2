"""The stronger micro teacher that on-policy distillation (OPD) learns from: the micro model trained
further by GRPO on training problems only. ``agentopd micro teacher`` rebuilds the shipped one
(``agentopd/testbed/micro_teacher``, what ``teacher.model: micro-teacher`` loads)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

from agentopd.envs.procedural import HELDOUT_SEED
from agentopd.testbed.micro import heldout_problems


@dataclass
class TeacherRecipe:
    """The stronger micro teacher: the micro model trained further by GRPO on training problems only
    (the ``functions`` generator's training split, never the held-out seed), so it shares the
    micro tokenizer and knows what RL teaches it (the environment's convention for ambiguous
    examples, which the warm start leaves to chance)."""

    seed: int = 100
    """The training run's seed (the benchmarks' student runs use 0, 1, 2)."""
    steps: int = 100
    lr: float = 2e-4
    config: str = "micro-grpo.yaml"
    """The shipped config it trains with (GRPO, groups of 4, 8 problems per step)."""
    heldout: int = 100
    """Held-out problems for the teacher's own pass@1 (measured after, never used to choose)."""


def build_teacher(out: str, recipe: TeacherRecipe | None = None, base: str = "micro", progress: bool = True) -> dict:
    """Train the micro teacher from ``base`` by ``recipe`` and save it under ``out`` (a
    ``save_pretrained`` directory, the tokenizer included); returns the summary also written to
    ``out/teacher.json`` (the recipe, its held-out pass@1 on code at temperature 1, seconds)."""
    import shutil
    import tempfile

    from agentopd.config import SamplingConfig, load
    from agentopd.eval.heldout import heldout_pass1
    from agentopd.inference import load_pretrained
    from agentopd.inference.hf import HFEngine
    from agentopd.judges import make_judge
    from agentopd.train import train

    recipe = recipe or TeacherRecipe()
    t0 = time.perf_counter()
    configs = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    with tempfile.TemporaryDirectory() as run:
        cfg = load(os.path.join(configs, recipe.config),
                   [f"model.path={base}", f"run.steps={recipe.steps}", f"run.seed={recipe.seed}",
                    f"optim.lr={recipe.lr}", f"run.out={run}", "eval.problems=0", "run.checkpoint_every=0",
                    f"run.progress={str(progress).lower()}"])
        train(cfg)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(os.path.join(run, "final"), out)
    model, tok = load_pretrained(out)
    judge = make_judge("tests")
    try:
        pass1 = heldout_pass1(HFEngine(model.eval(), tok), tok, heldout_problems("code", recipe.heldout), judge, 2,
                              SamplingConfig(max_new_tokens=cfg.sampling.max_new_tokens), HELDOUT_SEED)
    finally:
        judge.close()
    summary = {"recipe": asdict(recipe), "base": base, "heldout_pass1": {"code": pass1},
               "seconds": time.perf_counter() - t0}
    with open(os.path.join(out, "teacher.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary

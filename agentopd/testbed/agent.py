"""The micro agent: the micro model warm-started on a few hundred tool-use demonstrations of
``agentopd/CodeAgent-v0`` (what ``model.path: micro-agent`` loads; built on first use, a few minutes).

Each demonstration is an episode on a training problem of the ``functions`` generator (never a
held-out one), in one of three shapes: the final answer at once; ``run_tests`` on the right code,
the real judge's "All 3 tests passed.", then that code as the answer; or ``run_tests`` on a wrong
attempt (:func:`agentopd.testbed.micro._wrong_code`), the real judge's critique of it, then the right
answer. Every assistant turn is a target (the conversation before it is the prompt), tool calls in
the env's Hermes markup with the env's tool hint in the prompt, so the model plays the env as is.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass

from agentopd.envs.agent import TOOL_HINT
from agentopd.testbed.micro import heldout_problems

AGENT_DIR = os.path.join(os.path.dirname(__file__), "micro_agent")
"""Where ``model.path: micro-agent`` is looked for first (a checkout that ships it)."""
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "agentopd", "micro-agent")
"""Where it is built when no checkout ships it."""
LIMITS = {"max_turns": 3, "max_tool_calls": 3, "max_tokens": 768}
"""The episode limits of ``configs/micro-agent.yaml`` (its held-out pass@1 is measured under them)."""


@dataclass
class AgentRecipe:
    seed: int = 0
    problems: int = 900
    """Training problems (one demonstration each)."""
    shapes: tuple[float, float, float] = (0.3, 0.3, 0.4)
    """Shares of the three shapes: answer at once, test then answer, test a wrong attempt then repair."""
    steps: int = 800
    batch: int = 16
    lr: float = 1e-3
    heldout: int = 60
    """Held-out problems for the warm start's pass@1 (2 episodes each, temperature 1)."""


def _call(code: str) -> str:
    return "<tool_call>" + json.dumps({"name": "run_tests", "arguments": {"code": code}}) + "</tool_call>"


def _code(fenced: str) -> str:
    return fenced.split("```python\n", 1)[1].rsplit("\n```", 1)[0]


def demonstrations(recipe: AgentRecipe) -> list[tuple[list[dict], str]]:
    """(messages, target) pairs: every assistant turn of the demonstration episodes."""
    from agentopd.envs.data import split_tests
    from agentopd.envs.procedural import function_problems, function_solution
    from agentopd.judges import make_judge
    from agentopd.testbed.micro import _wrong_code

    held = {p.prompt for p in heldout_problems("code", 200)}
    problems = [p for p in function_problems(recipe.problems, recipe.seed + 17, convention=False)
                if p.prompt not in held]
    r = random.Random(recipe.seed)
    shapes = [r.choices((0, 1, 2), weights=recipe.shapes)[0] for _ in problems]
    tried = [function_solution(p) if s == 1 else _wrong_code(p, r) for p, s in zip(problems, shapes)]
    judge = make_judge("tests")
    try:  # the real judge's critique of each tested attempt, on the public tests (the prompt's examples)
        critiques = [j.critique for j in judge.judge_many([(split_tests(p, 1)[0], t)
                                                           for p, t in zip(problems, tried)])]
    finally:
        judge.close()
    out = []
    for p, shape, attempt, critique in zip(problems, shapes, tried, critiques):
        user = [{"role": "user", "content": p.prompt + TOOL_HINT}]
        if shape == 0 or shape == 2 and critique.startswith("All "):  # (a wrong attempt that passes: skip it)
            out.append((user, function_solution(p)))
            continue
        call = _call(_code(attempt))
        out.append((user, call))
        out.append((user + [{"role": "assistant", "content": call},
                            {"role": "tool", "name": "run_tests", "content": critique}], function_solution(p)))
    r.shuffle(out)
    return out


def build_agent(out: str, recipe: AgentRecipe | None = None, base: str = "micro", progress: bool = True) -> dict:
    """Warm-start ``base`` (``"micro"``, the shipped micro model, or a checkpoint dir) on the demonstrations and save it under ``out``; returns the summary also
    written to ``out/agent.json`` (the recipe, the held-out pass@1 and tool use of agent episodes at
    temperature 1 under :data:`LIMITS`, seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agentopd.config import SamplingConfig
    from agentopd.envs.agent import AgentVectorEnv
    from agentopd.envs.procedural import HELDOUT_SEED
    from agentopd.eval.heldout import heldout_eval
    from agentopd.inference.hf import HFEngine
    from agentopd.judges import make_judge
    from agentopd.testbed.micro import _encode, ensure, sft

    recipe = recipe or AgentRecipe()
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    path = ensure(progress=progress) if base == "micro" else base
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    examples = demonstrations(recipe)
    losses = sft(model, _encode(tok, examples), recipe.steps, recipe.batch, recipe.lr, recipe.seed,
                 tok.pad_token_id, progress)
    judge = make_judge("tests")
    try:
        venv = AgentVectorEnv.over(heldout_problems("code", recipe.heldout), judge, 2, **LIMITS)
        heldout = heldout_eval(HFEngine(model, tok), tok, venv, recipe.heldout, 2, SamplingConfig(max_new_tokens=96),
                               HELDOUT_SEED, LIMITS["max_turns"])
    finally:
        judge.close()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    summary = {"recipe": asdict(recipe), "base": base, "examples": len(examples),
               "final_loss": sum(losses[-30:]) / len(losses[-30:]), "heldout": heldout,
               "seconds": time.perf_counter() - t0}
    with open(os.path.join(out, "agent.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def ensure_agent(progress: bool = True) -> str:
    """The micro agent's checkpoint directory: the shipped one, else the cached one (built first)."""
    for path in (AGENT_DIR, CACHE_DIR):
        if os.path.exists(os.path.join(path, "agent.json")):
            return path
    build_agent(CACHE_DIR, progress=progress)
    return CACHE_DIR

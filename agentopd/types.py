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

"""What watches the learning itself: updates whose numbers are not finite, and collapse. (What
watches the machine, signals, disks and services, is :mod:`agentopd.faults`.)

**Non-finite updates.** The learner skips an optimizer step whose loss, gradient norm or teacher
log-probs are not finite (:class:`agentopd.rl.learner.Update`, ``skipped``); :meth:`Guard.skipped`
counts them in a row, and after ``optim.max_bad_steps`` the run stops with a checkpoint of the last
good weights (those the skipped steps left as they were).

**Collapse.** Long self-distillation runs have been seen to collapse late: the held-out accuracy
falls to about 0 after hundreds of steps, with the responses getting short or the sampling entropy
going to 0 first. :meth:`Guard.observe` follows three signs against their running best:
``heldout_pass1`` (each evaluation), and ``response_len`` and ``entropy`` (their mean over the last
``run.guard_window`` steps). One that falls below ``(1 - run.guard_drop)`` x its best is a
finding; ``run.guard`` says what the run does then: ``warn`` (a line), ``stop`` (a checkpoint and
:data:`agentopd.faults.UNHEALTHY`) or ``rollback`` (back to the newest checkpoint at or before
:meth:`Guard.target`, the learning rate times ``run.guard_lr_factor``, and on). The guard's state
is saved in every checkpoint, so a resumed run watches as the uninterrupted one did.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SIGNS = ("heldout_pass1", "response_len", "entropy")
"""What the collapse guard follows: higher is healthier for each."""


@dataclass
class Guard:
    drop: float = 0.5
    """A sign below ``(1 - drop)`` x its running best is a finding."""
    window: int = 5
    """Steps averaged for response_len and entropy."""
    max_bad: int = 3
    """Non-finite updates in a row that stop the run."""
    best: dict = field(default_factory=dict)
    """sign -> [best value, its step]."""
    recent: dict = field(default_factory=dict)
    """sign -> its last ``window`` values (response_len, entropy)."""
    best_step: int = 0
    """The step of the best held-out evaluation (0: none after a step)."""
    healthy_step: int = 0
    """The last step without a finding."""
    bad_in_row: int = 0
    last_good: int = 0
    """The step of the last update that was applied."""

    def skipped(self, step: int, term: str) -> tuple[str, bool]:
        """A skipped update at ``step`` (``term``: what was not finite): its line, and whether that
        makes ``max_bad`` in a row (the run stops)."""
        self.bad_in_row += 1
        if self.bad_in_row >= self.max_bad:
            return (f"step {step}: stopped after {self.bad_in_row} skipped updates in a row (optim.max_bad_steps): "
                    f"{term} is not finite"), True
        return (f"step {step}: the update was skipped: {term} is not finite ({self.bad_in_row} in a row; "
                f"optim.max_bad_steps={self.max_bad} stops the run)"), False

    def applied(self, step: int) -> None:
        self.bad_in_row, self.last_good = 0, step

    def observe(self, row: dict) -> tuple[list[str], bool]:
        """A step's metrics row: the findings (one line each) and whether its held-out evaluation
        is the best so far."""
        step, findings, new_best = row["step"], [], False
        for sign in SIGNS:
            value = self._value(sign, row.get(sign))
            if value is None:
                continue
            best, at = self.best.get(sign, (None, 0))
            if best is None or value > best:
                self.best[sign] = [value, step]
                new_best |= sign == "heldout_pass1"
            elif best > 0 and value < (1 - self.drop) * best:
                findings.append(f"{sign} {value:.3g} is below {1 - self.drop:.0%} of its best, {best:.3g} at step {at}")
        if new_best and step > 0:
            self.best_step = step
        if not findings:
            self.healthy_step = step
        return findings, new_best

    def _value(self, sign: str, value) -> float | None:
        """What is compared for ``sign``: the evaluation as it is, or the mean of the last ``window``
        steps' values (None until there are that many)."""
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        if sign == "heldout_pass1":
            return float(value)
        last = self.recent.setdefault(sign, [])
        last.append(float(value))
        del last[:-self.window]
        return sum(last) / len(last) if len(last) == self.window else None

    def target(self) -> int:
        """The step to roll back to (at or before): the best held-out evaluation's, else the last
        step without a finding."""
        return self.best_step or self.healthy_step

    def rolled_back(self) -> None:
        """After a rollback: the windows start again (the best values stay: the model is back where
        it had them)."""
        self.recent.clear()

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if k not in ("drop", "window", "max_bad"):  # the options are this run's
                setattr(self, k, v)

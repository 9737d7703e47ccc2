"""Asynchronous rollouts (``run.async_steps: k``): the rollouts of the next ``k`` steps are generated
while the learner updates, by a :class:`agentopd.inference.worker.ProcessEngine` (its own copy of
the weights), one job at a time in one background thread (judging included, as in a synchronous
step).

Step ``j``'s rollouts are always sampled with the weights before update ``max(j - k, 0)`` (its
*version*), whatever the timing: the run is the same run to run for a seed, and a checkpoint keeps
the last ``k`` versions' trained parameters so that a resumed run samples exactly what the
uninterrupted one did. Rollouts are at most ``k`` updates stale; the learner corrects them as it
corrects cached ones (:mod:`agentopd.rl.offpolicy`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class AsyncRollouts:
    """``rollout(engine, step) -> episodes, timing`` run ahead on ``engine`` (a ProcessEngine) for the
    steps before ``last``."""

    def __init__(self, k: int, engine, rollout: Callable, last: int):
        self.k, self.engine, self.rollout, self.last = k, engine, rollout, last
        self.versions: dict[int, dict] = {}  # version -> trained parameters (the last k + the current)
        self.jobs: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="async-rollouts")

    def version(self, step: int) -> int:
        return max(step - self.k, 0)

    def _run(self, step: int, weights: dict):
        self.engine.load(weights)
        return self.rollout(self.engine, step)

    def take(self, step: int, model) -> tuple[list, object, int, float]:
        """Step ``step``'s episodes and timing, the updates they are stale by and the seconds waited
        for them; ``model``: the learner's, before update ``step`` (its weights are this version).
        The jobs of steps up to ``step + k`` are queued first."""
        self.versions[step] = self.engine.trained_state(model)
        for j in range(step, min(step + self.k, self.last - 1) + 1):
            if j not in self.jobs:
                self.jobs[j] = self.pool.submit(self._run, j, self.versions[self.version(j)])
        self.versions = {v: w for v, w in self.versions.items() if v >= step + 1 - self.k}
        t0 = time.perf_counter()
        episodes, timing = self.jobs.pop(step).result()
        return episodes, timing, step - self.version(step), time.perf_counter() - t0

    def drain(self) -> None:
        """Wait for the queued jobs (their results are kept): nothing else judges meanwhile."""
        for f in list(self.jobs.values()):
            f.exception()

    def state_dict(self, step: int) -> dict:
        """What a checkpoint after ``step`` updates keeps: the versions the next steps sample with."""
        return {v: w for v, w in self.versions.items() if step - self.k <= v < step}

    def load_state_dict(self, state: dict) -> None:
        self.versions = {int(v): w for v, w in state.items()}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

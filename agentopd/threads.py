"""How many torch threads and worker processes a process runs, so that they share its cores without
OpenMP spin stalls.

torch's CPU ops run on an OpenMP team; between parallel regions its threads spin, waiting for
work. When the team has more threads than the cores left to it (other processes' torch threads,
the judge's sandbox or math workers busy beside it), a spinning thread holds a core that the one
with work needs, and every parallel region waits out a time slice: on 2 shared cores a step has
been seen to take 10x longer. The policy:

- count the cores this process may run on (``os.sched_getaffinity``: taskset, cpusets and
  container limits), not the machine's (``os.cpu_count``);
- worker pools (sandbox workers, math verifiers) default to that many;
- torch gets at most that many intra-op threads, less the cores that workers busy at the same
  time need (judging overlaps generation with ``sampling.generate_chunk``), at least one;
- torch's threads wait passively (``OMP_WAIT_POLICY=PASSIVE``: a waiting thread sleeps instead
  of spinning) on a machine of at most ``SMALL_MACHINE`` cores, where a second busy process
  always shares a core with the team. OpenMP reads this once, when torch loads, so
  :func:`configure_env` must run before ``import torch`` (the ``agentopd`` command does).

An explicit choice always wins: ``OMP_NUM_THREADS`` or ``OMP_WAIT_POLICY`` in the environment, a
``workers=`` argument. ``AGENTOPD_THREAD_POLICY=off`` turns the whole policy off (the defaults of
torch and ``os.cpu_count()``), the "before" arm of ``bench/step_cost.py``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

SMALL_MACHINE = 4  # cores: at most this many, torch's OpenMP threads wait passively
ENV_SWITCH = "AGENTOPD_THREAD_POLICY"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "false", "no")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1; under torchrun, this rank's
    share of them (``LOCAL_WORLD_SIZE`` ranks on this host), so that one machine's ranks do not
    oversubscribe it."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


@dataclass(frozen=True)
class ThreadPlan:
    torch_threads: int
    """torch's intra-op threads."""
    workers: int
    """Worker processes of a pool (sandbox workers, math verifiers)."""
    passive_wait: bool
    """OMP_WAIT_POLICY=PASSIVE for torch's OpenMP team."""


def plan(cores: int, workers: int | None = None, busy_workers: int = 0) -> ThreadPlan:
    """The policy on ``cores`` usable cores: ``workers`` per pool (None: one per core), and torch's
    threads when ``busy_workers`` worker processes compute at the same time as torch (each gets a
    core, but torch keeps at least one)."""
    cores = max(1, cores)
    return ThreadPlan(torch_threads=max(1, cores - max(0, busy_workers)), workers=max(1, workers or cores),
                      passive_wait=cores <= SMALL_MACHINE)


def worker_count(requested: int | None = None) -> int:
    """A pool's size: ``requested``, else one per usable core (policy off: ``os.cpu_count()``)."""
    if requested:
        return requested
    return plan(usable_cores()).workers if enabled() else (os.cpu_count() or 1)


def configure_env(environ=os.environ) -> dict:
    """Before torch loads: ``OMP_WAIT_POLICY=PASSIVE`` on a small machine unless the environment
    already chooses; returns what it set."""
    if not enabled() or "OMP_WAIT_POLICY" in environ or not plan(usable_cores()).passive_wait:
        return {}
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_torch(busy_workers: int = 0) -> int | None:
    """Cap torch's intra-op threads at :func:`plan`'s count (never raise them: a lower count set
    in code stays; nothing when ``OMP_NUM_THREADS`` chooses or the policy is off); returns the
    count torch has then, or None."""
    if not enabled() or os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    n = plan(usable_cores(), busy_workers=busy_workers).torch_threads
    if torch.get_num_threads() > n:
        torch.set_num_threads(n)
    return torch.get_num_threads()

"""The thread policy (agentopd.threads): counts from the cores a process may use; explicit choices win."""
import os

from agentopd import threads


def test_plan_gives_workers_a_core_each_and_torch_the_rest():
    assert threads.plan(2) == threads.ThreadPlan(torch_threads=2, workers=2, passive_wait=True)
    assert threads.plan(2, busy_workers=2).torch_threads == 1  # torch keeps at least one
    assert threads.plan(8, busy_workers=3).torch_threads == 5
    assert threads.plan(8, workers=3).workers == 3
    assert threads.plan(1, busy_workers=4) == threads.ThreadPlan(1, 1, True)
    assert not threads.plan(threads.SMALL_MACHINE + 1).passive_wait


def test_usable_cores_is_the_affinity_not_the_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert threads.usable_cores() == 2
    monkeypatch.delenv(threads.ENV_SWITCH, raising=False)
    assert threads.worker_count() == 2
    assert threads.worker_count(5) == 5  # an explicit size wins
    monkeypatch.setenv(threads.ENV_SWITCH, "off")
    assert threads.worker_count() == 64  # the "before": os.cpu_count()


def test_configure_env_sets_passive_wait_only_when_nothing_chose(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv(threads.ENV_SWITCH, raising=False)
    env = {}
    assert threads.configure_env(env) == {"OMP_WAIT_POLICY": "PASSIVE"} and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.configure_env(env) == {} and env["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.setenv(threads.ENV_SWITCH, "off")
    env = {}
    assert threads.configure_env(env) == {} and env == {}


def test_configure_torch_leaves_an_explicit_omp_num_threads_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(threads.ENV_SWITCH, raising=False)
    assert threads.configure_torch() is None


def test_configure_torch_caps_but_never_raises(monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.ENV_SWITCH, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    was = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert threads.configure_torch() == 1  # a lower count chosen in code stays
        torch.set_num_threads(4)
        assert threads.configure_torch() == 2  # more than the usable cores: capped
        assert threads.configure_torch(busy_workers=1) == 1
    finally:
        torch.set_num_threads(was)

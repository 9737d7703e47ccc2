"""Fixtures shared by the test modules: ``serve`` (an OpenAI-compatible server on loopback, see
tests/openai_server.py) and ``no_proxy``; ``micro_dir`` (a micro model
warm-started at a test budget)."""
pytest_plugins = ["openai_server"]


import pytest


@pytest.fixture(scope="session")
def micro_dir(tmp_path_factory):
    """A micro model warm-started for a few steps on a small mix (seconds, not minutes): the real
    pipeline of ``agentopd micro pretrain`` at a test budget."""
    from agentopd.testbed.micro import MicroConfig, pretrain

    out = tmp_path_factory.mktemp("micro")
    pretrain(str(out), MicroConfig(n_math=240, n_code=48, steps=8, batch=16, heldout=6), progress=False)
    return out

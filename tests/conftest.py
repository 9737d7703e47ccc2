"""Fixtures shared by the test modules: ``serve`` (an OpenAI-compatible server on loopback, see
tests/openai_server.py) and ``no_proxy``."""
pytest_plugins = ["openai_server"]

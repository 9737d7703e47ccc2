"""Shared by the test modules: a bwrap sandbox that really runs a program, or a skip that says why."""
import pytest

from agentopd.sandbox import Limits, SandboxUnavailable, make_sandbox


def bwrap_or_skip(**kw):
    try:
        sb = make_sandbox("bwrap", **kw)
    except SandboxUnavailable as e:
        pytest.skip(f"bwrap sandbox unavailable: {e}")
    r = sb.run("print(6 * 7)", "", Limits(timeout_s=20))
    if r.status != "ok" or r.stdout.strip() != "42":
        sb.close()
        pytest.skip(f"bwrap sandbox does not work here: {r.status} {r.stderr[-300:]}")
    return sb

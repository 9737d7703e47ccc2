"""Sandboxes: run untrusted programs isolated (``bwrap`` by default, ``docker``, ``unshare``, or
``process``, which is not isolation). ``make_sandbox(backend)`` picks one; the backends live in
:mod:`agentopd.sandbox.backends`, the warm worker each sandbox forks from in
:mod:`agentopd.sandbox.zygote`, the call-style test driver in :mod:`agentopd.sandbox.calltests`."""
from agentopd.sandbox.backends import (  # noqa: F401
    BACKENDS,
    KNOWN_PROGRAMS,
    PYTHON,
    Limits,
    Sandbox,
    SandboxUnavailable,
    build_local_image,
    make_sandbox,
    run_many,
)

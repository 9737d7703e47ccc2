"""The package's layout: every module imports on its own, in any order, and no two modules import
each other, directly or through others, counting the imports inside functions (a local import only
hides a cycle)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"agentopd": ROOT / "agentopd"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, base in PACKAGES.items():
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            out[name] = f
    return out


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its body (``from a.b import c`` names module
    ``a.b.c`` where that is one, else ``a.b``)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # every import counts: inside functions and under TYPE_CHECKING too
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in known:
                    found.add(sub)
                elif node.module in known:
                    found.add(node.module)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), and self-imports."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle_through_a_third_module():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_in_a_circle():
    mods = modules()
    graph = {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle with them
    assert cycles(graph) == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles(graph))


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_every_module_imports_alone_and_in_any_order(order):
    names = sorted(modules())
    if order == "reverse":
        names = names[::-1]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    for chunk in (names, ):
        r = subprocess.run([sys.executable, "-c", code, *chunk], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]

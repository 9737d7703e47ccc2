"""The code in a chat model's answer, as the test judge runs it.

Real chat models format code in many ways: prose before and after a fenced block, several blocks
(the function, then a usage example), a closing fence with no opening one, an opening fence never
closed, example ``print`` calls, ``if __name__ == "__main__":`` demos, a body without its ``def``.

1. **Pieces.** The answer is cut at every fence line (a line that starts with three backticks),
   whatever pairs with what, so a missing opening or closing fence costs nothing. A stretch after a
   ```` ```python ```` (``py``, ``python3``) fence is code; after another language's fence it is
   not. Any other stretch is code when it compiles as Python and does more than name things (prose
   such as ``Example`` or ``Output: 5`` compiles too); else its runs of lines that compile and start
   with a ``def``, ``class``, import or decorator (evalplus's "longest span that parses", bounded);
   else, after a ``prefix`` (the problem's prompt), a function body without its ``def``.
2. **A program** (``call=False``; stdin/stdout problems): the last piece from a python fence that
   compiles, else the last that compiles, else the last python-fenced one (the judge then reports its
   syntax error), else the last body.
3. **Definitions** (``call=True``; problems whose tests call the program's functions): every piece
   that compiles, in order, reduced to its imports, functions and classes, and the top-level
   statements that bind or fill in a name they or the tests read (an assignment, a loop that fills a
   table, ``table.append(...)``). A later definition replaces an earlier one when Python runs them,
   as in a notebook. Other top-level calls, prints, asserts and loops, ``if __name__`` blocks and
   anything that reads stdin are dropped: the tests call the definitions, and a demo that crashes,
   reads stdin or loops would fail them all.

evalplus's sanitizer (``evalplus.sanitize``) does steps 1 and 3 with tree-sitter on the whole text;
this module uses the standard library's ``ast`` so that the judge needs nothing more (evalplus pulls
in API clients for three vendors and imports ``datasets`` on import); ``bench/real_model.py``
compares the two on a real model's answers.
"""
from __future__ import annotations

import ast
import re
import textwrap

PYTHON = {"python", "py", "python3", "py3"}
_FENCE = re.compile(r"[ \t]*```+[ \t]*([\w+#.-]*)")
_STARTS = re.compile(r"(def |async def |class |import |from \S+ import |@)")
_DEFS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
MAX_SPAN_LINES = 400
"""A stretch longer than this is not searched for runs of code (each try compiles a span)."""
MAX_STARTS = 20
"""At most this many lines are tried as the start of a run of code."""


def _compiles(src: str) -> ast.Module | None:
    """The module's AST when ``src`` compiles (the compiler's checks too: ``return`` outside a function)."""
    try:
        tree = ast.parse(src)
        compile(tree, "<answer>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return None
    return tree


def _prose(stmt: ast.stmt) -> bool:
    """A statement that prose also parses to: a bare name or constant, ``Word: words`` (an annotation)."""
    if isinstance(stmt, ast.Expr):
        return isinstance(stmt.value, (ast.Name, ast.Constant, ast.Attribute))
    return isinstance(stmt, ast.AnnAssign) and stmt.value is None


def _code(src: str) -> bool:
    tree = _compiles(src)
    return tree is not None and any(not _prose(s) for s in tree.body)


def _body(src: str, prefix: str) -> bool:
    """``src`` is an indented function body that compiles after ``prefix`` and is not prose."""
    if not src[:1].isspace() or not _compiles(prefix + "\n" + src):
        return False
    try:
        return any(not _prose(s) for s in ast.parse(textwrap.dedent(src)).body)
    except SyntaxError:
        return False


def _runs(lines: list[str]) -> list[str]:
    """The runs of lines that compile, each from a line that starts a definition or import, as long as
    it can be, left to right without overlap."""
    out, i, tries = [], 0, 0
    if len(lines) > MAX_SPAN_LINES:
        return out
    while i < len(lines) and tries < MAX_STARTS:
        if _STARTS.match(lines[i]):
            tries += 1
            end = next((j for j in range(len(lines), i, -1) if _code("\n".join(lines[i:j]))), None)
            if end is not None:
                out.append("\n".join(lines[i:end]).rstrip() + "\n")
                i = end
                continue
        i += 1
    return out


def _stretches(text: str) -> list[tuple[str | None, str]]:
    """``(tag, text)`` of each stretch between fence lines; ``tag`` the language the fence line before
    it names ('' for a bare fence, None before the first)."""
    out, tag, lines = [], None, []
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if m:
            out.append((tag, lines))
            tag, lines = m.group(1).lower(), []
        else:
            lines.append(line)
    out.append((tag, lines))
    return [(t, "\n".join(ls)) for t, ls in out if "".join(ls).strip()]


def pieces(text: str, prefix: str = "") -> list[tuple[str, str]]:
    """The code pieces of an answer in order, ``(kind, code)``: kind ``python`` (from a python fence,
    compiles), ``code`` (compiles), ``broken`` (from a python fence, does not compile), ``body`` (a
    function body that compiles after ``prefix``)."""
    out = []
    for tag, raw in _stretches(text):
        if tag and tag not in PYTHON:
            continue
        src = textwrap.dedent(raw).strip("\n") + "\n"
        if _code(src):
            out.append(("python" if tag else "code", src))
        elif prefix and _body(raw.strip("\n") + "\n", prefix):
            out.append(("body", raw.strip("\n") + "\n"))
        else:
            runs = _runs(src.split("\n"))
            out += [("python" if tag else "code", r) for r in runs]
            if not runs and tag:
                out.append(("broken", src))
    return out


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _reads(node: ast.AST) -> set[str]:
    """The names ``node`` reads from outside: for a function, class or lambda, less its parameters and
    the names it assigns, plus those it declares ``global``; scopes nested in it are not told apart."""
    loads = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
        bound = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
        bound |= {a.arg for a in ast.walk(node) if isinstance(a, ast.arg)}
        shared = {name for g in ast.walk(node) if isinstance(g, (ast.Global, ast.Nonlocal)) for name in g.names}
        loads = (loads - bound) | shared
    return loads


def _lines(stmt: ast.stmt) -> tuple[int, int]:
    """The 1-based first and last line of a statement, its decorators included."""
    first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
    return first, stmt.end_lineno


def _fills(stmt: ast.stmt) -> set[str]:
    """The names a top-level statement binds or fills in: assigned names (loop variables
    included), the containers under a subscript or attribute it assigns (``table[i] = ...``) and the
    objects whose methods it calls (``table.append(x)``)."""
    out = set()
    for n in ast.walk(stmt):
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            out.add(n.id)
        elif isinstance(n, (ast.Subscript, ast.Attribute)) and not isinstance(n.ctx, ast.Load):
            base = n.value
            while isinstance(base, (ast.Subscript, ast.Attribute)):
                base = base.value
            if isinstance(base, ast.Name):
                out.add(base.id)
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name):
            out.add(n.func.value.id)
    return out


def _demo(stmt: ast.stmt) -> bool:
    """An ``if __name__ == "__main__":`` block, or a statement that reads stdin (``input()``)."""
    if isinstance(stmt, ast.If) and "__name__" in _names(stmt.test):
        return True
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "input"
               for n in ast.walk(stmt))


def definitions(code: str, roots: set[str] = frozenset()) -> str:
    """``code`` (which must compile) reduced to its imports, functions and classes, and the other
    top-level statements (assignments, and loops or calls that fill a table) that bind or fill in a
    name that these, the other kept statements or ``roots`` (the names the tests use) read, in their
    order. Demo blocks and statements that read stdin are never kept."""
    tree = ast.parse(code)
    keep = [s for s in tree.body if isinstance(s, _DEFS)]
    used = set(roots).union(*(_reads(s) for s in keep))
    demos = [s for s in tree.body if _demo(s)]
    rest = [(s, _fills(s), _reads(s)) for s in tree.body if not isinstance(s, _DEFS) and s not in demos
            and not (isinstance(s, ast.AnnAssign) and s.value is None)]
    only_demo = set().union(*(_fills(s) for s in demos)) - set().union(*(f for _, f, _ in rest))
    rest = [r for r in rest if not r[2] & only_demo]  # (it reads what only a demo binds: it would fail)
    grew = True
    while grew:
        new = [(s, reads) for s, fills, reads in rest if s not in keep and used & fills]
        keep += [s for s, _ in new]
        used |= set().union(*(reads for _, reads in new))
        grew = bool(new)
    lines = code.split("\n")
    spans = sorted(_lines(s) for s in keep)
    return "".join("\n".join(lines[a - 1:b]) + "\n" for a, b in spans)


def extract_code(text: str, call: bool = False, prefix: str = "", roots: set[str] = frozenset()) -> str | None:
    """The code to judge in an answer (the module docstring): a program, or with ``call`` the
    definitions that tests using ``roots`` call; ``prefix``: the prompt the code will follow, so a
    bare function body counts. None when there is no code."""
    got = pieces(text, prefix)
    whole = [c for k, c in got if k in ("python", "code")]
    if call and whole:
        defs = definitions("".join(whole), roots)
        if defs.strip() and _compiles(defs):
            return defs
    for kinds in (("python",), ("code",), ("broken",), ("body",)):
        last = [c for k, c in got if k in kinds]
        if last:
            return last[-1]
    return None


def test_names(payload: dict) -> set[str]:
    """The names a call-style problem's tests (and their setup) use."""
    out = set()
    for src in [payload.get("setup", "")] + list(payload.get("tests", [])):
        tree = _compiles(src) if isinstance(src, str) else None
        out |= _names(tree) if tree else set()
    return out | ({payload["entry_point"]} if payload.get("entry_point") else set())


def problem_code(problem, response: str) -> str | None:
    """The code the test judge runs after ``problem.payload["prefix"]`` for a chat answer."""
    p = problem.payload
    call = p.get("style") == "call"
    return extract_code(response, call=call, prefix=p.get("prefix", ""), roots=test_names(p) if call else set())

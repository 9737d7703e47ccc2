"""The judge protocol, the registry, and reward statistics that leave judge failures out.

A judge turns (problem, response) into a :class:`Judgement` (a Verdict and a critique). Judges are
named in configs by a registered name (``"tests"``), by an import path (``"pkg.module:Class"``),
or by a dict ``{"name": ..., **kwargs}``; third parties register through the entry-point group
``agentopd.judges``.
"""
from __future__ import annotations

import asyncio
import importlib
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

from agentopd.types import Judgement, Problem, TestResult, Verdict

ENTRY_POINT_GROUP = "agentopd.judges"

# built-ins by import path, so that naming one never imports another's dependencies
_BUILTIN = {
    "tests": "agentopd.judges.tests:TestJudge",
    "math": "agentopd.judges.math:MathJudge",
    "llm": "agentopd.judges.llm:LLMJudge",
    "composite": "agentopd.judges.composite:CompositeJudge",
}
_REGISTERED: dict[str, Any] = {}


@runtime_checkable
class Judge(Protocol):
    def judge(self, problem: Problem, response: str) -> Judgement: ...

    def judge_many(self, pairs: list[tuple[Problem, str]], progress=None) -> list[Judgement]: ...


class BaseJudge:
    """Gives a judge that defines ``judge`` the batched (thread pool of ``workers``) and async
    paths, and a no-op ``close``."""

    workers: int = 8

    def judge(self, problem: Problem, response: str) -> Judgement:
        raise NotImplementedError

    def judge_many(self, pairs: list[tuple[Problem, str]], progress=None) -> list[Judgement]:
        def one(pair):
            j = guarded(self.judge, *pair)
            if progress:
                progress(1)
            return j

        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as ex:
            return list(ex.map(one, pairs))

    def __deepcopy__(self, memo):
        # a judge is a service (sandbox pools, worker processes, HTTP clients): copies share it,
        # which is what gymnasium's make/check_env need when a judge is passed to an env
        return self

    async def ajudge_many(self, pairs: list[tuple[Problem, str]]) -> list[Judgement]:
        return await asyncio.to_thread(self.judge_many, pairs)

    def close(self) -> None:
        pass


def judge_error(message: str, total: int = 1) -> Judgement:
    """The judge failed (not the answer): score NaN, excluded from statistics and updates."""
    return Judgement(Verdict(math.nan, 0, total, "judge_error", [TestResult("judge_error", error=message)]), "")


def guarded(fn, *args):
    """``fn(*args)``, or the judge error that names what it raised: one sample's failure (a bad
    row, a crashed scorer, a reply of any shape) never takes the batch with it."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- by design: anything, as this sample's judge_error
        return judge_error(f"judge failed on this sample: {type(e).__name__}: {e}"[:1000])


def register(name: str):
    """Class decorator: make a judge available by ``name`` in configs."""

    def deco(cls):
        _REGISTERED[name] = cls
        return cls

    return deco


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> dict[str, str]:
    """Every judge name that ``make_judge`` accepts, with where it comes from."""
    out = dict(_BUILTIN)
    out.update({n: f"{c.__module__}:{c.__qualname__}" for n, c in _REGISTERED.items()})
    out.update({n: ep.value for n, ep in _entry_points().items()})
    return out


def _import(path: str):
    mod, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"judge import path {path!r} must look like 'package.module:Class'")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"judge {path!r}: cannot import {mod} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"judge {path!r}: {mod} has no {attr}")
        obj = getattr(obj, part)
    return obj


def resolve(name: str):
    """The judge class (or factory) for a registered name or an import path."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        return _import(_BUILTIN[name])
    eps = _entry_points()
    if name in eps:
        return eps[name].load()
    if ":" in name:
        return _import(name)
    import difflib

    close = difflib.get_close_matches(name, list(available()), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown judge {name!r}{hint} (known: {', '.join(sorted(available()))}, "
                     "or an import path 'package.module:Class')")


def make_judge(spec, **kwargs):
    """Build a judge from a name, an import path, a dict ``{"name": ..., **kwargs}`` or an object
    that already judges."""
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name", None) or spec.pop("type", None)
        if not name:
            raise ValueError(f"judge config {spec} needs a 'name'")
        return make_judge(name, **{**spec, **kwargs})
    if isinstance(spec, str):
        factory = resolve(spec)
        try:
            return factory(**kwargs)
        except TypeError as e:
            raise ValueError(f"judge {spec!r}: bad arguments {sorted(kwargs)} ({e})") from None
    if hasattr(spec, "judge"):
        return spec
    raise ValueError(f"cannot make a judge from {spec!r}")


def reward_stats(judgements: list[Judgement]) -> dict:
    """Mean score and pass rate over the judged samples; judge errors are counted, not scored."""
    ok = [j.verdict for j in judgements if j.verdict.status != "judge_error"]
    n = len(ok)
    return {
        "reward_mean": sum(v.score for v in ok) / n if n else math.nan,
        "pass_rate": sum(v.status == "ok" for v in ok) / n if n else math.nan,
        "judged": n,
        "judge_errors": len(judgements) - n,
    }


class ByKindJudge(BaseJudge):
    """Routes each problem to the judge for its ``kind`` ("code", "math", ...); batches per kind."""

    def __init__(self, judges: dict[str, Judge]):
        self.judges = judges

    def _for(self, problem: Problem):
        if problem.kind not in self.judges:
            raise ValueError(f"no judge for problems of kind {problem.kind!r} (have {sorted(self.judges)})")
        return self.judges[problem.kind]

    def judge(self, problem: Problem, response: str) -> Judgement:
        return self._for(problem).judge(problem, response)

    def judge_many(self, pairs, progress=None):
        out: list[Judgement | None] = [None] * len(pairs)
        for kind, judge in self.judges.items():
            idx = [i for i, (p, _) in enumerate(pairs) if p.kind == kind]
            if idx:
                got = guarded(judge.judge_many, [pairs[i] for i in idx], progress)
                for i, j in zip(idx, got if isinstance(got, list) else [got] * len(idx)):
                    out[i] = j
        return [j if j is not None else judge_error(f"no judge for problems of kind {pairs[i][0].kind!r} "
                                                    f"(have {sorted(self.judges)})") for i, j in enumerate(out)]

    def close(self):
        for j in self.judges.values():
            close = getattr(j, "close", None)
            if close:
                close()

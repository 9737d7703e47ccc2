"""``agentopd diagnose teacher``: can the teacher teach, and from which source?

On a config's held-out problems: G answers per problem from the plain prompt, judged; then, for each
teacher source the config can use (:func:`sources`: the self-teacher shown the ``feedback``, a
``demonstration``, both, or the problem's ``reference`` solution; a separate teacher ``model`` with
its ``teacher.context``), every sample's teacher prompt as training builds it and

- ``pass1``: the success rate of one answer *sampled* from each teacher context by the source's
  model (``pass1_wrong``: over the contexts of wrong samples only, the repair rate), against
  ``student_pass1_same``, the plain-prompt pass@1 of the same problems weighted the same way
  (``gap`` = the difference);
- ``auc`` / ``auc_mean``: how well the sequence log-ratio ``sum_t (lt_t - ls_t)`` (its per-token
  mean) of the student's SAME response ids separates correct from wrong samples;
- ``ratio_correct`` / ``ratio_wrong``: the mean per-token log-ratio over the tokens of correct and of
  wrong samples;
- ``blame_in_wrong`` / ``blame_at_divergence``: where a reference answer is known, whether a wrong
  sample's lowest-ratio token lies where the answer is actually wrong.

It ends with a recommendation (:func:`recommend`): distil from a teacher model that is clearly better
than the student and whose log-ratio separates right from wrong; a blend with GRPO when only a
self-teacher shown privileged information beats the student; GRPO when no source does.

At the start of training the self-teacher's weights are the student's in every teacher mode (ema and
frozen copy them, trust_region mixes two equal models), so the model scores both sides here.

The ``feedback`` source differs from training in one way: training gives a correct sample no
critique (only wrong samples get a teacher signal from it), so that the AUC is defined this source
gives correct samples their own judge critique ("Correct: 42.", "All 5 tests passed."). That critique
states the verdict, so this AUC is an upper bound on what the critique can tell apart.

The pure functions (``auc``, ``sequence_ratios``, ``mean_ratios``, ``step_metrics``,
``divergence``, ``blame``) also serve the training loop's per-step ``teacher_auc``,
``ratio_correct`` and ``ratio_wrong``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

SELF_SOURCES = {"self+feedback": ["feedback"], "self+demonstration": ["demonstration"],
                "self+feedback+demonstration": ["feedback", "demonstration"], "self+reference": ["reference"]}
"""The self-teacher's sources: name -> its ``teacher.context``."""
GAP_TO_DISTIL = 0.10
"""A teacher whose sampled pass@1 beats the student's by at least this much (and whose log-ratio
separates right from wrong, ``AUC_TO_DISTIL``) is worth distilling from alone."""
AUC_TO_DISTIL = 0.6
DEFAULT_PROBLEMS = 50
"""Held-out problems when the config's run.eval_problems is 0."""


# ----------------------------------------------------------------------------- pure functions


def auc(scores, labels) -> float | None:
    """The probability that a random positive scores above a random negative, ties counted 1/2
    (the Mann-Whitney U statistic over n_pos * n_neg), from average ranks; None when one class is
    absent."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).flatten().bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # the rank of each distinct value's last occurrence
    avg_rank = last - (counts.double() - 1) / 2
    rank_sum = avg_rank[inverse][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def sequence_ratios(ls_BT, lt_BT, mask_BT) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-ratio ``sum_t (lt_t - ls_t)`` over the masked tokens and its mean
    (0 for a row without tokens)."""
    r_BT = (lt_BT - ls_BT) * mask_BT
    n_B = mask_BT.sum(-1)
    return r_BT.sum(-1), r_BT.sum(-1) / n_B.clamp(min=1)


def mean_ratios(ls_BT, lt_BT, mask_BT, success_B, rows_B) -> tuple[float | None, float | None]:
    """The mean per-token log-ratio over the masked tokens of the selected rows (``rows_B``) that
    succeeded, and of those that failed; None where there is no such token."""
    r_BT = (lt_BT - ls_BT) * mask_BT
    out = []
    for cls_B in (success_B.bool(), ~success_B.bool()):
        sel_BT = mask_BT * (rows_B.bool() & cls_B).float()[:, None]
        n = float(sel_BT.sum())
        out.append(float((r_BT * sel_BT).sum()) / n if n else None)
    return out[0], out[1]


def step_metrics(ls_BT, lt_BT, mask_BT, teacher_mask_B, success_B) -> dict:
    """A training step's ``teacher_auc`` (AUC of the sequence log-ratio over the samples with a
    teacher context; None with one class only), ``ratio_correct`` and ``ratio_wrong``."""
    rows_B = teacher_mask_B.bool() & (mask_BT.sum(-1) > 0)
    seq_B, _ = sequence_ratios(ls_BT, lt_BT, mask_BT)
    correct, wrong = mean_ratios(ls_BT, lt_BT, mask_BT, success_B, rows_B)
    return {"teacher_auc": auc(seq_B[rows_B], success_B.bool()[rows_B]), "ratio_correct": correct,
            "ratio_wrong": wrong}


def divergence(response: str, reference: str) -> int | None:
    """The index of the first character where ``response`` departs from ``reference``; None when
    the response has no such character (it equals the reference or is a prefix of it)."""
    for i, (a, b) in enumerate(zip(response, reference)):
        if a != b:
            return i
    return len(reference) if len(response) > len(reference) else None


def token_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """The ``[start, end)`` characters of each token in ``decode(ids, skip_special_tokens=True)``
    (a special token: an empty span)."""
    pieces = [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
    if "".join(pieces) != tokenizer.decode(ids, skip_special_tokens=True):  # a character across tokens
        ends = [len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True)) for k in range(len(ids))]
        return list(zip([0] + ends[:-1], ends))
    spans, pos = [], 0
    for p in pieces:
        spans.append((pos, pos + len(p)))
        pos += len(p)
    return spans


def blame(ratio_T, spans: list[tuple[int, int]], d: int) -> dict:
    """Where the lowest-ratio token of a wrong answer lies, given its first wrong character ``d``:
    ``in_wrong`` (the token covers a character at or after ``d``; an empty-span token, at or after
    ``d``), ``at_divergence`` (the token holds character ``d``), and the ratios at the divergence token
    (None when no token holds ``d``) and at the other tokens."""
    ratio_T = torch.as_tensor(ratio_T, dtype=torch.float64)
    k = int(ratio_T.argmin())
    start, end = spans[k]
    at = [j for j, (s, e) in enumerate(spans) if s <= d < e]
    others = [float(ratio_T[j]) for j in range(len(spans)) if j not in at]
    return {"in_wrong": (end - 1 if end > start else start) >= d, "at_divergence": bool(at) and k == at[0],
            "ratio_at": float(ratio_T[at[0]]) if at else None, "ratio_others": others}


def reference_answer(problem, generator: str) -> str | None:
    """The reference response of a problem, where one is known: the column scratchpad of the
    ``micro`` generator, the fenced ``def f`` of ``functions``, else ``privileged["solution"]`` or
    ``payload["solution"]``."""
    from agentopd.envs.procedural import function_solution, micro_solution

    if generator == "micro":
        return micro_solution(problem)
    if generator == "functions":
        return function_solution(problem)
    return (problem.privileged or {}).get("solution") or (problem.payload or {}).get("solution")


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def kind_stats(ls_BT, lt_BT, mask_BT, success_B, teacher_ok_B, student_rate_B, blames: list[dict]) -> dict:
    """One context kind's figures from its rows (the samples with a teacher context): the student's
    and teacher's log-probs of the same response ids, the sample's success, the success of the
    answer sampled from its teacher context (None: judge error, left out), its problem's plain pass
    rate, and the :func:`blame` of each wrong sample whose first wrong character is known."""
    success_B = success_B.bool()
    seq_B, mean_B = sequence_ratios(ls_BT, lt_BT, mask_BT)
    correct, wrong = mean_ratios(ls_BT, lt_BT, mask_BT, success_B, torch.ones_like(success_B))
    judged = [b for b, ok in enumerate(teacher_ok_B) if ok is not None]
    pass1 = _mean([float(teacher_ok_B[b]) for b in judged])
    same = _mean([float(student_rate_B[b]) for b in judged])
    others = [r for bl in blames for r in bl["ratio_others"]]
    return {
        "n": len(success_B), "n_correct": int(success_B.sum()), "n_wrong": int((~success_B).sum()),
        "pass1": pass1, "pass1_wrong": _mean([float(teacher_ok_B[b]) for b in judged if not success_B[b]]),
        "student_pass1_same": same, "gap": None if pass1 is None else pass1 - same,
        "auc": auc(seq_B, success_B), "auc_mean": auc(mean_B, success_B),
        "ratio_correct": correct, "ratio_wrong": wrong,
        "n_blame": len(blames), "blame_in_wrong": _mean([float(bl["in_wrong"]) for bl in blames]),
        "blame_at_divergence": _mean([float(bl["at_divergence"]) for bl in blames]),
        "ratio_at_divergence": _mean([bl["ratio_at"] for bl in blames]), "ratio_other": _mean(others),
    }


# ------------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class _Plain:
    """The plain-prompt samples: ``gens[b]`` answers ``problems[b // G]``."""

    problems: list
    prompt_ids: list
    gens: list
    judgements: list
    ls: list  # the student's log-probs of each response, 1-D cpu tensors

    def success(self, b: int) -> bool:
        return self.judgements[b].verdict.status == "ok"


def _setup(cfg, judge):
    """The config with its held-out count, the held-out problems and the judge; every check that
    needs no model."""
    from agentopd.config import ConfigError
    from agentopd.rl.models import precision
    from agentopd.rollout import env_specs, make_envs

    if cfg.eval.problems <= 0:
        print(f"note: eval.problems is 0: diagnosing on {DEFAULT_PROBLEMS} held-out problems", file=sys.stderr)
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"problems": DEFAULT_PROBLEMS})})
    precision(cfg.run.precision)
    env_id, _, held_kw = env_specs(cfg)
    venv = make_envs(env_id, held_kw if judge is None else {**held_kw, "judge": judge}, [1])[0]
    if not hasattr(venv, "env"):
        venv.close()
        raise ConfigError(f"diagnose needs one of agentopd's envs (their problems and judge), not {env_id}")
    return cfg, venv.problems[:cfg.eval.problems], venv.env.judge


def _generate(engine, prompt_ids, n, cfg, seed: int, desc: str) -> list:
    """``n`` samples of each prompt, flat, a chunk of prompts at a time (a progress bar over chunks)."""
    from tqdm import tqdm

    per_call = cfg.sampling.generate_chunk or 8
    out = []
    for s in tqdm(range(0, len(prompt_ids), per_call), desc=desc, disable=not cfg.run.progress, file=sys.stderr):
        got = engine.generate(prompt_ids[s:s + per_call], n=n, max_new_tokens=cfg.sampling.max_new_tokens,
                              temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, seed=seed + s)
        out += [g for gs in got for g in gs]
    return out


def _logprobs(model, prompt_ids, response_ids, cfg, desc: str) -> list[torch.Tensor]:
    """Per-token log-probs of the response ids after each prompt, as training scores them."""
    from tqdm import tqdm

    from agentopd.rl.teacher import score

    step = max(cfg.optim.micro_batch, 1)
    out = []
    for s in tqdm(range(0, len(prompt_ids), step), desc=desc, disable=not cfg.run.progress, file=sys.stderr):
        got = score(model, prompt_ids[s:s + step], response_ids[s:s + step], micro_batch=step)[0]
        out += [lp.float().cpu() for lp in got]
    return out


def _sample_plain(cfg, problems, tok, model, engine, judge, seed: int) -> _Plain:
    from agentopd.inference.base import apply_chat

    prompt_ids = [apply_chat(tok, [{"role": "user", "content": p.prompt}]) for p in problems]
    G = cfg.sampling.group_size
    gens = _generate(engine, prompt_ids, G, cfg, seed, "student samples")
    judgements = judge.judge_many([(problems[b // G], g.text) for b, g in enumerate(gens)])
    ls = _logprobs(model, [prompt_ids[b // G] for b in range(len(gens))], [g.response_ids for g in gens], cfg,
                   "student scores")
    return _Plain(problems, prompt_ids, gens, judgements, ls)


@dataclasses.dataclass
class Source:
    """One teacher source: its name, what its teacher sees (``teacher.context``), the model that
    scores the student's answers under it and the engine that samples from it."""

    name: str
    context: list
    model: object
    engine: object


def sources(cfg, problems, model, engine, teacher_model=None, teacher_engine=None) -> list[Source]:
    """The sources a config can use: the self-teacher with each of :data:`SELF_SOURCES`
    (``self+reference`` only where some problem has a reference solution), and the separate
    ``teacher.model`` with ``teacher.context`` when the config names one."""
    has_ref = any((p.privileged or {}).get("solution") for p in problems)
    out = [Source(name, ctx, model, engine) for name, ctx in SELF_SOURCES.items()
           if has_ref or "reference" not in ctx]
    if teacher_model is not None:
        name = "+".join(["model", *cfg.teacher.context])
        out.append(Source(name, list(cfg.teacher.context), teacher_model, teacher_engine))
    return out


def _contexts(source: Source, plain: _Plain, tok, cfg, template) -> list:
    """Each plain sample's teacher prompt ids for this source (None: no context), built by
    :func:`agentopd.rl.teacher.teacher_contexts`; the feedback-only source also gives each correct
    sample its own critique (see the module's docstring)."""
    from agentopd.rl.teacher import build_teacher_context, reference_text, teacher_contexts

    tcfg = cfg.teacher.model_copy(update={"context": source.context})
    G = cfg.sampling.group_size
    refs = [reference_text(p.privileged, p.kind) for p in plain.problems]
    ctx = teacher_contexts(tok, [p.prompt for p in plain.problems], plain.gens, plain.judgements, G, tcfg, template,
                           refs, [plain.prompt_ids[b // G] for b in range(len(plain.gens))])
    if source.context == ["feedback"]:
        for b, g in enumerate(plain.gens):
            if plain.success(b) and g.response_ids:
                ctx[b] = build_teacher_context(tok, plain.problems[b // G].prompt, plain.judgements[b].critique,
                                               None, template, tcfg.max_tokens)
    return ctx


def _blames(plain: _Plain, rows: list[int], ls: list, lt: list, tok, cfg) -> list[dict]:
    """:func:`blame` of every wrong row whose problem has a reference answer that it departs from."""
    out = []
    for b, ls_T, lt_T in zip(rows, ls, lt):
        ref = reference_answer(plain.problems[b // cfg.sampling.group_size], cfg.env.kwargs.get("problems"))
        d = None if plain.success(b) or ref is None else divergence(plain.gens[b].text, ref)
        if d is not None:
            out.append(blame(lt_T - ls_T, token_spans(tok, plain.gens[b].response_ids), d))
    return out


def _source(source: Source, plain: _Plain, tok, judge, cfg, template, seed: int) -> dict:
    """The figures of one teacher source (see :func:`kind_stats`)."""
    from agentopd.rl.learner import pad_BT

    G = cfg.sampling.group_size
    ctx = _contexts(source, plain, tok, cfg, template)
    rows = [b for b, c in enumerate(ctx) if c is not None]
    prompts = [ctx[b] for b in rows]
    lt = _logprobs(source.model, prompts, [plain.gens[b].response_ids for b in rows], cfg,
                   f"{source.name}: teacher scores")
    ls = [plain.ls[b] for b in rows]
    ls_BT, mask_BT = pad_BT(ls)
    lt_BT, _ = pad_BT(lt)
    gens = _generate(source.engine, prompts, 1, cfg, seed, f"{source.name}: teacher samples")
    verdicts = [j.verdict.status for j in judge.judge_many([(plain.problems[b // G], g.text)
                                                             for b, g in zip(rows, gens)])]
    teacher_ok = [None if v == "judge_error" else v == "ok" for v in verdicts]
    rate = {}
    for i in {b // G for b in rows}:
        judged = [plain.success(k) for k in range(i * G, (i + 1) * G)
                  if plain.judgements[k].verdict.status != "judge_error"]
        rate[i] = sum(judged) / max(len(judged), 1)
    success_B = torch.tensor([plain.success(b) for b in rows], dtype=torch.bool)
    return kind_stats(ls_BT, lt_BT, mask_BT, success_B, teacher_ok, [rate[b // G] for b in rows],
                      _blames(plain, rows, ls, lt, tok, cfg))


def recommend(contexts: dict) -> dict:
    """The objective the figures support (the rule the sample-efficiency benchmark backs; see the
    README): ``distil`` (``algo.loss: opd``) from a separate teacher model whose sampled pass@1 beats
    the student's by :data:`GAP_TO_DISTIL` and whose log-ratio separates right from wrong (AUC at least
    :data:`AUC_TO_DISTIL`): it knows what the student can learn from the prompt alone. A self-teacher
    shown privileged information (a reference, a sibling's answer, the critique) passes that test more
    easily, since it may copy what the student cannot infer, and distilling it alone trails GRPO on the
    micro testbed; so the best self-teacher that beats the student gives ``blend`` (GRPO plus its
    per-token credit, ``algo.advantage: hybrid``), and ``grpo`` when no source beats the student."""
    scored = {k: c for k, c in contexts.items() if c.get("gap") is not None}
    if not scored:
        return {"objective": "grpo", "source": None, "why": "no source's teacher could be measured"}

    def fig(c):
        return (f"teacher pass@1 {c['pass1']:.3f} vs student {c['student_pass1_same']:.3f}, AUC "
                + ("-" if c["auc"] is None else f"{c['auc']:.2f}"))

    models = {k: c for k, c in scored.items() if k.startswith("model")}
    good = {k: c for k, c in models.items() if c["gap"] >= GAP_TO_DISTIL and (c["auc"] or 0.0) >= AUC_TO_DISTIL}
    if good:
        name, best = max(good.items(), key=lambda kv: kv[1]["gap"])
        return {"objective": "distil", "loss": "opd", "source": name,
                "why": f"the teacher model is clearly better and its credit separates right from wrong ({fig(best)})"}
    name, best = max(scored.items(), key=lambda kv: kv[1]["gap"])
    if best["gap"] > 0:
        return {"objective": "blend", "advantage": "hybrid", "source": name,
                "why": f"{name} beats the student ({fig(best)}); no teacher model clearly does"}
    return {"objective": "grpo", "source": None, "why": f"no source's teacher beats the student (best: {name}, {fig(best)})"}


def _teacher_parts(cfg, tok, device, engine_cls):
    """The separate teacher model and an engine around it, or (None, None)."""
    if not cfg.teacher.model:
        return None, None
    from agentopd.rl.models import load_teacher

    teacher = load_teacher(cfg.teacher, None, device, cfg.run.seed, cfg.run.progress).model_for_scoring()
    return teacher, engine_cls(teacher, tok, device=next(teacher.parameters()).device)


def diagnose_teacher(cfg, engine=None, judge=None) -> dict:
    """Run the diagnostic of a :class:`agentopd.config.Config` (module docstring); returns the report, also written
    to ``<run.out>/diagnose.json`` (and its table to ``summary.md``). ``engine`` / ``judge``: as in
    :func:`agentopd.train.train`. A served teacher (``teacher.base_url``) is not diagnosed here."""
    from agentopd.envs.procedural import HELDOUT_SEED
    from agentopd.inference.hf import HFEngine
    from agentopd.rl.models import autocast, load_model, pick_device, precision
    from agentopd.rl.teacher import TeacherTemplate

    cfg, problems, judge = _setup(cfg, judge)
    torch.manual_seed(cfg.run.seed)
    device = pick_device(cfg.run.device)
    engine_cls = engine or HFEngine
    try:
        model, tok = load_model(cfg.model, cfg.run, device)
        model.eval()
        engine = engine_cls(model, tok, device=device)
        seed = cfg.run.seed * 1_000_003 + HELDOUT_SEED
        with torch.no_grad(), autocast(precision(cfg.run.precision), device)():
            plain = _sample_plain(cfg, problems, tok, model, engine, judge, seed)
            srcs = sources(cfg, problems, model, engine, *_teacher_parts(cfg, tok, device, engine_cls))
            contexts = {src.name: _source(src, plain, tok, judge, cfg, TeacherTemplate(), seed + 7919 * (k + 1))
                        for k, src in enumerate(srcs)}
    finally:
        if hasattr(judge, "close"):
            judge.close()
    ok = [j.verdict.status == "ok" for j in plain.judgements if j.verdict.status != "judge_error"]
    report = {"model": cfg.model.path, "teacher_model": cfg.teacher.model or None, "problems": len(problems),
              "group_size": cfg.sampling.group_size, "samples": len(plain.gens),
              "judge_errors": len(plain.judgements) - len(ok), "student_pass1": _mean([float(x) for x in ok]),
              "contexts": contexts, "recommendation": recommend(contexts)}
    _write(cfg.run.out, report)
    return report


def table(report: dict) -> str:
    """The report as a markdown table: one row per figure, one column per teacher source; then the recommendation."""
    def fmt(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    kinds = list(report["contexts"])
    keys = list(next(iter(report["contexts"].values())))
    head = (f"student pass@1 {fmt(report['student_pass1'])} on {report['problems']} held-out problems x "
            f"{report['group_size']} samples ({report['model']})\n\n")
    lines = ["| figure | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    lines += [f"| {k} | " + " | ".join(fmt(report["contexts"][c][k]) for c in kinds) + " |" for k in keys]
    rec = report.get("recommendation")
    tail = f"\nrecommendation: {rec['objective']}" + (f" from {rec['source']}" if rec["source"] else "") + \
        f": {rec['why']}\n" if rec else ""
    return head + "\n".join(lines) + "\n" + tail


def _write(out: str, report: dict) -> None:
    """``diagnose.json`` and ``summary.md``, each whole or not at all (agentopd.faults.write_text)."""
    from agentopd import faults

    os.makedirs(out, exist_ok=True)
    faults.write_text(os.path.join(out, "diagnose.json"), json.dumps(report, indent=2))
    faults.write_text(os.path.join(out, "summary.md"), table(report))

"""``agentopd train --dry-run``: everything but the training, in seconds and without a GPU.

1. The config's checks (:func:`agentopd.train.check`, without loading vLLM or a teacher's
   tokenizer: the dry run loads what is local itself) and the ranks' split of the batch.
2. The env and its judge, built as training builds them; the reference solutions of the first few
   problems that have one (training and held-out) run through the judge, on the tests that give
   the reward and on those that give the critique: a reference that fails its own tests means
   broken tests (or a broken reference). A math reference without a ``\\boxed{}`` answer gets the
   expected one appended, so that checks the answer parses and verifies against itself.
3. The student's and the teacher's tokenizer and model config where they are local (a checkpoint
   dir, the hub cache, ``tiny``/``micro``; nothing is downloaded, no weights are read), else the
   config of a model the recipes name (:data:`agentopd.memory.KNOWN`); the tokenizers compared,
   and the vocabularies (a teacher with more rows than the student's needs ``algo.distill_topk``).
4. The plan: steps, rollouts and tokens per step (the prompts' lengths measured with the
   tokenizer), the teacher source, and the per-GPU memory (:func:`agentopd.memory.estimate`).
"""
from __future__ import annotations

import dataclasses

from agentopd import memory
from agentopd.config import Config, ConfigError

GiB = memory.GiB


@dataclasses.dataclass
class ModelInfo:
    """What the dry run knows of a model: its tokenizer and :class:`agentopd.memory.Shape` (None
    where not local), and where they came from."""

    name: str
    tokenizer: object
    shape: memory.Shape | None
    source: str


def model_info(path: str, seed: int = 0) -> ModelInfo:
    """A model's tokenizer and shape, from local files only."""
    if path == "tiny":
        from agentopd.testbed.tiny import build_tiny

        model, tok = build_tiny(seed=seed)
        return ModelInfo(path, tok, memory.shape_of(model.config), "built from a config")
    from transformers import AutoConfig, AutoTokenizer

    from agentopd.inference import resolve_path

    where = resolve_path(path, progress=False)
    found = {}
    for key, cls in (("config", AutoConfig), ("tokenizer", AutoTokenizer)):
        try:
            found[key] = cls.from_pretrained(where, local_files_only=True)
        except (OSError, ValueError, KeyError):
            found[key] = None
    config, source = found["config"], "local"
    if config is None:
        config, source = memory.known_config(path), "not local: its published config" if path in memory.KNOWN else "not local"
    return ModelInfo(path, found["tokenizer"], memory.shape_of(config) if config is not None else None, source)


def check_models(cfg: Config, student: ModelInfo, teacher: ModelInfo | None) -> list[str]:
    """The teacher's tokenizer against the student's and its vocabulary rows against the loss
    (a ConfigError), and notes on what could not be checked here."""
    from agentopd.rl.teacher import tokenizer_mismatch

    notes = [f"{m.name}: tokenizer not local, not checked" for m in (student, teacher) if m and m.tokenizer is None]
    if teacher is None:
        return notes
    if student.tokenizer is not None and teacher.tokenizer is not None:
        why = tokenizer_mismatch(student.tokenizer, teacher.tokenizer)
        if why:
            raise ConfigError(f"teacher.model {teacher.name!r} and model.path {student.name!r} have different "
                              f"tokenizers ({why}): token-level distillation needs the same tokenizer")
    if student.shape and teacher.shape and student.shape.vocab != teacher.shape.vocab:
        sv, tv = student.shape.vocab, teacher.shape.vocab
        if tv < sv or not cfg.algo.distill_topk:
            raise ConfigError(f"the teacher's vocabulary has {tv} rows and the student's {sv}: the divergence over "
                              "the full vocabulary needs equal rows; set algo.distill_topk (the student's top-K) "
                              "with a teacher of at least the student's rows")
        notes.append(f"vocabulary rows: student {sv}, teacher {tv} (same tokenizer, padded): over the student's "
                     f"top-{cfg.algo.distill_topk}")
    return notes


def reference_answer(problem) -> str | None:
    """The answer a reference solution gives the judge (None: the problem has none)."""
    from agentopd.rl.teacher import reference_text

    text = reference_text(problem.privileged, problem.kind)
    if text and problem.kind == "math" and "\\boxed" not in text:
        text += f"\n\nThe answer is \\boxed{{{problem.payload.get('answer')}}}."
    return text


def check_references(venv, n: int) -> dict:
    """The first ``n`` problems of an agentopd vector env that have a reference, judged on the
    tests that give the reward and on those that give the critique (one batched call each)."""
    from agentopd.envs.base import judge_turns

    env = getattr(venv, "env", None)
    if env is None or not hasattr(env, "views"):
        return {"skipped": "not an agentopd env: no problems to check"}
    have = [p for p in env.problems if reference_answer(p)]
    picks = have[:n]
    judged = judge_turns(env.judge, [env.views(p) for p in picks], [reference_answer(p) for p in picks])
    broken = [{"id": p.id, "reward": f"{h.verdict.status} {h.verdict.passed}/{h.verdict.total}",
               "critique": f"{c.verdict.status} {c.verdict.passed}/{c.verdict.total}"}
              for p, (c, h) in zip(picks, judged) if not c.verdict.status == h.verdict.status == "ok"]
    return {"problems": len(env.problems), "with_reference": len(have), "checked": len(picks),
            "passed": len(picks) - len(broken), "broken": broken}


def prompt_tokens(venv, tok, n: int = 200) -> dict | None:
    """Token counts of the first ``n`` prompts as the student sees them (chat template applied)."""
    from agentopd.inference.base import apply_chat

    problems = getattr(getattr(venv, "env", None), "problems", None)
    if tok is None or not problems:
        return None
    counts = [len(apply_chat(tok, [{"role": "user", "content": p.prompt}])) for p in problems[:n]]
    return {"measured": len(counts), "mean": round(sum(counts) / len(counts)), "max": max(counts)}


def teacher_source(cfg: Config) -> str:
    """The teacher in words."""
    from agentopd.rl import objectives

    t = cfg.teacher
    if not objectives.needs_teacher(cfg.algo):
        return f"none: {cfg.algo.loss}/{cfg.algo.advantage} reads no teacher"
    sees = " + ".join(t.context) or "the student's prompt only"
    if t.base_url:
        return f"a served model ({t.served_model} at {t.base_url}), top-{t.served_topk}, shown {sees}"
    if t.model:
        return f"a separate frozen model ({t.model}, {t.dtype}), shown {sees}"
    return f"the student itself ({t.mode}" + (f", tau {t.tau}" if t.mode == "ema" else "") + f"), shown {sees}"


def _envs(cfg: Config):
    from agentopd.rollout import env_specs, make_envs

    env_id, kw, held_kw = env_specs(cfg)
    venv = make_envs(env_id, kw, [1])[0]
    try:
        heldout = make_envs(env_id, held_kw, [1])[0] if held_kw is not None else None
    except BaseException:
        venv.close()
        raise
    return venv, heldout


def _steps(cfg: Config, ranks: int, prompts: dict | None) -> dict:
    """Rollouts and tokens per step (and per rank)."""
    s = cfg.sampling
    rollouts = s.prompts_per_step * s.group_size
    mean = prompts["mean"] if prompts else None
    out = {"steps": cfg.run.steps, "prompts_per_step": s.prompts_per_step, "group_size": s.group_size,
           "rollouts_per_step": rollouts, "rollouts_per_rank": rollouts // ranks, "max_turns": cfg.env.max_turns,
           "response_tokens_per_step_max": rollouts * s.max_new_tokens * cfg.env.max_turns}
    if mean is not None:
        out["prompt_tokens_per_step"] = rollouts * mean
    out["total_rollouts"] = rollouts * cfg.run.steps
    return out


def dry_run(cfg: Config, ranks: int = 1, gpu_gib: float | None = None, problems: int = 8) -> dict:
    """Everything training does before its first step but load the weights; the plan as a dict
    (:func:`render` prints it). A problem the real run would stop on raises as it would."""
    from agentopd.rl.distributed import check_ranks
    from agentopd.train import check

    check(cfg, load=False)
    check_ranks(cfg, ranks)
    student = model_info(cfg.model.path, cfg.run.seed)
    teacher = model_info(cfg.teacher.model, cfg.run.seed) if cfg.teacher.model else None
    notes = check_models(cfg, student, teacher)
    if cfg.engine.name == "vllm":
        notes += _vllm_note()
    venv, heldout = _envs(cfg)
    try:
        refs = {"train": check_references(venv, problems)}
        if heldout is not None:
            refs["heldout"] = check_references(heldout, problems)
        prompts = prompt_tokens(venv, student.tokenizer)
    finally:
        for v in (venv, heldout):
            if v is not None:
                v.close()
    from agentopd.rl.objectives import OBJECTIVES

    algo = cfg.algo.loss + (f"/{cfg.algo.advantage}" if OBJECTIVES[cfg.algo.loss].uses_advantage else "")
    plan = {"config": {"model": cfg.model.path, "lora_rank": cfg.model.lora_rank, "engine": cfg.engine.name,
                       "algorithm": algo, "ranks": ranks,
                       "distributed": cfg.run.distributed if ranks > 1 else "none"},
            "models": {m.name: {"source": m.source, "params": m.shape.params if m.shape else None,
                                "tokenizer": m.tokenizer is not None} for m in (student, teacher) if m},
            "references": refs, "prompt_tokens": prompts, "steps": _steps(cfg, ranks, prompts),
            "teacher": teacher_source(cfg), "notes": notes}
    plan["memory"] = _memory(cfg, student, teacher, prompts, gpu_gib, ranks)
    return plan


def _vllm_note() -> list[str]:
    try:
        from agentopd.inference.vllm import require_vllm

        require_vllm()
        return []
    except ImportError as e:
        return [f"engine vllm: not usable here ({e}); the GPU machine needs it"]


def _gpu_bytes(gpu_gib: float | None) -> tuple[int, str]:
    if gpu_gib:
        return int(gpu_gib * GiB), "given"
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1], torch.cuda.get_device_name()
    return 80 * GiB, "assumed: no GPU here (--gpu-gib)"


def _memory(cfg: Config, student: ModelInfo, teacher: ModelInfo | None, prompts: dict | None, gpu_gib, ranks) -> dict:
    if student.shape is None or (teacher is not None and teacher.shape is None):
        return {"skipped": "a model config is not local (and not among agentopd.memory.KNOWN)"}
    total, where = _gpu_bytes(gpu_gib)
    prompt = prompts["max"] if prompts else cfg.teacher.max_tokens
    seq = prompt + cfg.sampling.max_new_tokens * cfg.env.max_turns
    est = memory.estimate(cfg, student.shape, teacher.shape if teacher else None, seq, total, ranks)
    gib = lambda b: round(b / GiB, 2)
    return {"gpu_gib": gib(total), "gpu": where, "seq_len": seq,
            "rows": [{"what": name, "gib": gib(b), "how": how} for name, b, how in est.rows],
            "sampling_gib": gib(est.sampling), "update_gib": gib(est.update), "peak_gib": gib(est.peak),
            "vllm_share": est.vllm_share}


def render(plan: dict) -> str:
    """The plan as text."""
    c, s = plan["config"], plan["steps"]
    how = f"LoRA r={c['lora_rank']}" if c["lora_rank"] else "full"
    head = f"dry run: {c['model']} ({how}), engine {c['engine']}, loss {c['algorithm']}"
    lines = [f"{head}, {c['ranks']} rank(s) ({c['distributed']})"]
    lines += [f"  model {n}: {m['source']}, {m['params']:,} params" if m["params"] else f"  model {n}: {m['source']}"
              for n, m in plan["models"].items()]
    for split, r in plan["references"].items():
        lines.append(f"  references ({split}): " + (r["skipped"] if "skipped" in r else
                     f"{r['passed']}/{r['checked']} pass their tests ({r['with_reference']} of {r['problems']} "
                     "problems have one)"))
        lines += [f"    BROKEN {b['id']}: reward tests {b['reward']}, critique tests {b['critique']}"
                  for b in r.get("broken", [])]
    p = plan["prompt_tokens"]
    lines.append(f"  prompts: mean {p['mean']}, max {p['max']} tokens (first {p['measured']})" if p else
                 "  prompts: tokenizer not local, not measured")
    lines.append(f"  steps {s['steps']}: {s['prompts_per_step']} prompts x {s['group_size']} samples = "
                 f"{s['rollouts_per_step']} rollouts per step ({s['rollouts_per_rank']} per rank), "
                 f"up to {s['response_tokens_per_step_max']:,} response tokens"
                 + (f" + {s['prompt_tokens_per_step']:,} prompt tokens" if "prompt_tokens_per_step" in s else "")
                 + f"; {s['total_rollouts']:,} rollouts in all")
    lines.append(f"  teacher: {plan['teacher']}")
    lines += [f"  note: {n}" for n in plan["notes"]]
    lines += _render_memory(plan["memory"])
    return "\n".join(lines)


def _render_memory(m: dict) -> list[str]:
    if "skipped" in m:
        return [f"  memory: {m['skipped']}"]
    out = [f"  memory per GPU ({m['gpu_gib']} GiB, {m['gpu']}; sequences of {m['seq_len']} tokens):"]
    out += [f"    {r['what']:<40} {r['gib']:>7.2f} GiB   {r['how']}" for r in m["rows"]]
    out.append(f"    sampling {m['sampling_gib']:.2f} GiB, update {m['update_gib']:.2f} GiB: peak {m['peak_gib']:.2f} GiB")
    return out

"""A few rollouts of a training step, token by token, for ``agentopd report``: ``<run.out>/samples.jsonl``.

Every ``run.samples_every`` steps, at each held-out evaluation and at the last step, up to
``run.samples_per_step`` samples of the step (wrong and correct ones interleaved) are written as one
JSON row each: the step, the prompt, the response as token strings, each token's student and teacher
log-prob and advantage (the first ``run.samples_max_tokens`` tokens), the verdict, the judge's
critique (and whether the teacher context held it: a correct sample's does not) and the teacher
context's demonstration (None where the sample had none).
"""
from __future__ import annotations

import json
import math
import os

from agentopd.diagnose import token_spans
from agentopd.rl.teacher import pick_demonstration


def due(run, step: int, last: bool, evaluated: bool) -> bool:
    """Whether step ``step`` (1-based) writes samples; ``run`` is the ``RunConfig``."""
    return bool(run.samples_every) and (step % run.samples_every == 0 or last or evaluated)


def pick(success: list[bool], k: int) -> list[int]:
    """Up to ``k`` sample indices, wrong and correct ones interleaved (the wrong first)."""
    wrong = [b for b, ok in enumerate(success) if not ok]
    right = [b for b, ok in enumerate(success) if ok]
    mixed = [b for pair in zip(wrong, right) for b in pair]
    n = min(len(wrong), len(right))
    return (mixed + wrong[n:] + right[n:])[:k]


def token_strings(tok, ids: list[int]) -> list[str]:
    """Each token's piece of the decoded response (the pieces join to it); a special token, which
    decoding skips, as its vocabulary string."""
    text = tok.decode(ids, skip_special_tokens=True)
    pieces = [text[s:e] for s, e in token_spans(tok, ids)]
    return [p or tok.convert_ids_to_tokens(i) for p, i in zip(pieces, ids)]


def _floats(values) -> list[float | None]:
    return [round(float(v), 4) if math.isfinite(float(v)) else None for v in values]


def rows(step: int, tok, problems, gens, judgements, st, group_size: int, teacher_cfg, k: int,
         max_tokens: int) -> list[dict]:
    """The sample rows of one step: ``problems`` the step's prompts, ``gens`` / ``judgements`` its
    samples (``b // group_size`` is the prompt), ``st`` the step's ``agentopd.rl.learner.StepBatch``."""
    success = [j.verdict.status == "ok" for j in judgements]
    out = []
    for b in pick(success, k):
        i, ids = b // group_size, list(gens[b].response_ids)
        n = min(len(ids), max_tokens)
        group = [(gens[c].text, success[c]) for c in range(i * group_size, (i + 1) * group_size)]
        demo = (pick_demonstration(group, b - i * group_size, teacher_cfg.self_demonstration)
                if teacher_cfg.use_demonstration else None)
        has_teacher = st.teacher_prompts[b] is not None
        seen = (has_teacher and teacher_cfg.use_critique and not success[b]  # as teacher_contexts decides
                and not (demo is not None and teacher_cfg.drop_critique_with_demo))
        v = judgements[b].verdict
        out.append({
            "step": step, "sample": b, "prompt": problems[i].prompt, "response": gens[b].text,
            "tokens": token_strings(tok, ids[:n]), "n_tokens": len(ids),
            "student_lp": _floats(st.old_BT[b, :n]),
            "teacher_lp": _floats(st.teacher_BT[b, :n]) if has_teacher else None,
            "advantage": _floats(st.adv_BT[b, :n]),
            "status": v.status, "score": v.score if math.isfinite(v.score) else None, "correct": success[b],
            "critique": judgements[b].critique, "critique_in_context": seen, "demonstration": demo})
    return out


def record(cfg, step: int, last: bool, evaluated: bool, tok, problems, gens, judgements, st) -> None:
    """Append step ``step``'s rows to ``<run.out>/samples.jsonl`` when it is due (``cfg``: the
    ``TrainConfig``; the rest as in :func:`rows`)."""
    if not due(cfg.run, step, last, evaluated):
        return
    got = rows(step, tok, problems, gens, judgements, st, cfg.sampling.group_size, cfg.teacher,
               cfg.run.samples_per_step, cfg.run.samples_max_tokens)
    with open(os.path.join(cfg.run.out, "samples.jsonl"), "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in got)

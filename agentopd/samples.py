"""A few rollouts of a training step, token by token, for ``agentopd report``: ``<run.out>/samples.jsonl``.

Every ``run.samples_every`` steps, at each held-out evaluation and at the last step, up to
``run.samples_per_step`` samples of the step (wrong and correct ones interleaved) are written as one
JSON row each: the step, the prompt, the response as token strings, each token's student and teacher
log-prob and advantage (the first ``run.samples_max_tokens`` tokens), the verdict, the judge's
critique (and whether the teacher context held it: a correct sample's does not) and the teacher
context's demonstration (None where the sample had none).
"""
from __future__ import annotations

import math
import os

from agentopd import jsonl
from agentopd.diagnose import token_spans


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


def rows(step: int, tok, got, k: int, max_tokens: int) -> list[dict]:
    """The sample rows of one step: ``got`` the step (``agentopd.train.StepResult``: its episodes, their
    turns as learner rows, each row's teacher context, the batch and what the update computed)."""
    episodes, trows, contexts, st, upd = got.episodes, got.rows, got.contexts, got.batch, got.update
    judgements = [t.judgement for t in trows.turns]
    success = [j.verdict.status == "ok" for j in judgements]
    out = []
    for b in pick(success, k):
        g, c, ep = trows.turns[b], contexts[b] if contexts else None, episodes[trows.episodes[b]]
        ids = list(g.response_ids)
        n = min(len(ids), max_tokens)
        has_teacher = st.teacher_prompts[b] is not None
        v = judgements[b].verdict
        out.append({
            "step": step, "sample": b, "episode": trows.episodes[b], "turn": trows.turn_index[b] + 1,
            "turns": len(ep.turns), "prompt": ep.prompt, "response": g.text,
            "tokens": token_strings(tok, ids[:n]), "n_tokens": len(ids),
            "student_lp": _floats(upd.old_BT[b, :n]),
            "teacher_lp": _floats(st.teacher_BT[b, :n]) if has_teacher else None,
            "advantage": _floats(upd.adv_BT[b, :n]),
            "status": v.status, "score": v.score if math.isfinite(v.score) else None, "correct": success[b],
            "critique": judgements[b].critique, "critique_in_context": bool(c and c.critique_shown),
            "demonstration": c.demonstration if c else None})
    return out


def record(run, step: int, last: bool, evaluated: bool, tok, got) -> None:
    """Append step ``step``'s rows to ``<run.out>/samples.jsonl`` when it is due (``run``: the config's
    run section; ``got`` as in :func:`rows`)."""
    if not due(run, step, last, evaluated):
        return
    jsonl.append(os.path.join(run.out, "samples.jsonl"), rows(step, tok, got, run.samples_per_step,
                                                                 run.samples_max_tokens))

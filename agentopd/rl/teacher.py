"""The teacher: what it sees (its context, built from the privileged information a config names) and
which model it is (the student itself in one of its modes, a separate frozen model, or a model behind
a server), and the scorer that reads the student's SAME response ids under that context.

What it sees (``teacher.context``, a list of :data:`CONTEXT_SOURCES`): ``feedback`` (the judge's
critique of this turn, for a failed turn), ``demonstration`` (a successful sibling's final answer),
``reference`` (the problem's reference solution, ``Problem.privileged["solution"]``: OPSD/SDFT), or
the empty list: the student's own prompt ids, nothing added (vanilla on-policy distillation from a
separate teacher model)."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from agentopd.inference.base import apply_chat
from agentopd.rl.logprobs import lm_head_weight, response_hidden, sequence_logprobs

TEACHER_MODES = ("ema", "frozen", "live", "trust_region")
CONTEXT_SOURCES = ("feedback", "demonstration", "reference")
"""What a teacher context may show, in the order the template shows it (``reference`` first)."""
_THINK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


@dataclass
class TeacherTemplate:
    """How the teacher's user message is built (the shape of lasgroup/SDPO's reprompt):
    ``prompt + reference block + demonstration block + feedback block + instruction``. A block is
    left out when its text is None. The reference block reads like the demonstration block: both
    show a correct answer (the micro model's warm start was taught that block)."""

    reference: str = "\n\nCorrect solution:\n\n{reference}"
    demonstration: str = "\n\nCorrect solution:\n\n{demonstration}"
    feedback: str = "\n\nThe following is feedback from your unsuccessful earlier attempt:\n\n{critique}"
    instruction: str = "\n\nCorrectly solve the original question.\n"
    system: str | None = None

    def render(self, prompt: str, critique: str | None, demonstration: str | None, reference: str | None = None) -> str:
        text = prompt
        if reference is not None:
            text += self.reference.format(reference=reference)
        if demonstration is not None:
            text += self.demonstration.format(demonstration=demonstration)
        if critique is not None:
            text += self.feedback.format(critique=critique)
        return text + self.instruction

    def messages(self, prompt: str, critique: str | None, demonstration: str | None,
                 reference: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.render(prompt, critique, demonstration, reference)}]


def reference_text(privileged: dict | None, kind: str = "") -> str | None:
    """The reference answer a teacher is shown: ``privileged["solution"]``, fenced as a chat model
    writes code (```` ```python ````) when the problem is code and the solution is not fenced yet;
    None when the problem has none."""
    solution = (privileged or {}).get("solution")
    if not solution:
        return None
    if kind == "code" and "```" not in solution:
        return f"```python\n{solution.strip()}\n```"
    return solution


def _truncate(tokenizer, text: str | None, n_tokens: int) -> str | None:
    if text is None:
        return None
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= n_tokens else tokenizer.decode(ids[:max(n_tokens, 0)])


def _shares(need: list[int], budget: int) -> list[int]:
    """Split ``budget`` tokens among texts needing ``need[i]``: equal shares, what one text does not
    need going to the others (water-filling)."""
    keep, left = [0] * len(need), sorted(range(len(need)), key=lambda i: need[i])
    for k, i in enumerate(left):
        keep[i] = min(need[i], max(budget, 0) // (len(left) - k))
        budget -= keep[i]
    return keep


def build_teacher_context(tokenizer, prompt: str, critique: str | None, demonstration: str | None,
                          template: TeacherTemplate | None = None, max_tokens: int = 4096,
                          reference: str | None = None) -> list[int] | None:
    """The teacher PROMPT ids (chat template applied, assistant header at the end), or None when no
    block has a text (no signal: the sample is masked) or when even empty blocks do not fit
    ``max_tokens``. Only the critique, demonstration and reference texts are cut to fit (equal
    shares of what is left, :func:`_shares`), never the prompt, the template or the assistant header."""
    template = template or TeacherTemplate()
    texts = [critique or None, demonstration, reference]
    if all(t is None for t in texts):
        return None
    ids = apply_chat(tokenizer, template.messages(prompt, *texts))
    if len(ids) <= max_tokens:
        return ids
    base = len(apply_chat(tokenizer, template.messages(prompt, *(None if t is None else "" for t in texts))))
    budget = max_tokens - base
    need = [0 if t is None else len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    while budget >= 0:
        cut = [_truncate(tokenizer, t, n) for t, n in zip(texts, _shares(need, budget))]
        ids = apply_chat(tokenizer, template.messages(prompt, *cut))
        if len(ids) <= max_tokens:
            return ids
        budget -= len(ids) - max_tokens  # BPE merges across the cut: shrink by the excess and retry
    return None


def pick_demonstration(group: list[tuple[str, bool]], i: int, allow_self: bool = False) -> str | None:
    """The response text of the first successful sample of the group other than sample ``i``, or with
    ``allow_self`` the first successful one, sample ``i`` included."""
    for j, (text, success) in enumerate(group):
        if (allow_self or j != i) and success:
            return text
    return None


def strip_think(text: str) -> str:
    """``text`` without its ``<think>...</think>`` blocks and the whitespace after each."""
    return _THINK.sub("", text)


@dataclass
class ContextRow:
    """One row's teacher context: its ids (None: no teacher signal, the row is masked), the
    demonstration shown, whether the critique was shown and whether the reference was."""

    ids: list[int] | None
    demonstration: str | None
    critique_shown: bool
    reference_shown: bool = False


def teacher_contexts(tokenizer, prompts: list[str], samples: list, judgements: list, group_size: int,
                     cfg, template: TeacherTemplate | None = None, references: list[str | None] | None = None,
                     prompt_ids: list[list[int]] | None = None) -> list[list[int] | None]:
    """The teacher prompt ids of every sample of a single-turn step, exactly as training builds them:
    sample ``b`` answers ``prompts[b // group_size]``; ``samples[b]`` has ``.text`` and
    ``.response_ids``; ``judgements[b]`` its Judgement. See :func:`context_rows`."""
    return [r.ids for r in context_rows(tokenizer, prompts, samples, judgements, group_size, cfg, template,
                                        references=references, prompt_ids=prompt_ids)]


def context_rows(tokenizer, prompts: list[str], samples: list, judgements: list, group_size: int, cfg,
                 template: TeacherTemplate | None = None, episode_of: list[int] | None = None,
                 finals: list[tuple[str, bool]] | None = None, references: list[str | None] | None = None,
                 prompt_ids: list[list[int]] | None = None, tails: list[list[int] | None] | None = None
                 ) -> list[ContextRow]:
    """Each row's teacher context, from the sources ``cfg.context`` names. Row ``b`` is a turn of
    episode ``episode_of[b]`` (default: ``b``, one turn each), which answers ``prompts[episode //
    group_size]``. ``feedback``: a failed turn gets the critique that followed it (hindsight).
    ``demonstration``: any turn gets the final answer of the first other successful episode of its
    group (``finals[e]``: episode ``e``'s last answer and success; with ``cfg.self_demonstration`` the
    first successful one, itself included), without its ``<think>`` blocks with ``cfg.strip_think``;
    ``cfg.drop_critique_with_demo`` leaves the critique out where there is a demonstration.
    ``reference``: ``references[group]``, the problem's reference answer (:func:`reference_text`).
    An empty ``cfg.context``: the row's own prompt ids ``prompt_ids[b]`` as they are (a separate
    teacher model reads what the student read). ``tails[b]``: ids appended to the teacher's prompt
    ids (an agent turn's conversation since the first prompt, :func:`conversation_tails`). No signal
    (no block with a text, an empty response or a judge error): ``ids`` None. ``cfg``: a ``TeacherConfig``."""
    ok = [j.verdict.status == "ok" for j in judgements]
    episode_of = list(range(len(samples))) if episode_of is None else episode_of
    finals = [(g.text, s) for g, s in zip(samples, ok)] if finals is None else finals
    show = set(cfg.context)
    out = []
    for b, (g, j) in enumerate(zip(samples, judgements)):
        e = episode_of[b]
        i = e // group_size
        group = finals[i * group_size:(i + 1) * group_size]
        demo = (pick_demonstration(group, e - i * group_size, cfg.self_demonstration)
                if "demonstration" in show else None)
        if demo is not None and cfg.strip_think:
            demo = strip_think(demo)
        dropped = demo is not None and cfg.drop_critique_with_demo
        crit = j.critique if "feedback" in show and not ok[b] and not dropped else None
        ref = references[i] if "reference" in show and references else None
        ids = (list(prompt_ids[b]) if not show else
               build_teacher_context(tokenizer, prompts[i], crit, demo, template, cfg.max_tokens, ref))
        if ids is not None and show and tails and tails[b]:
            ids = ids + list(tails[b])
        usable = ids is not None and len(g.response_ids) > 0 and j.verdict.status != "judge_error"
        out.append(ContextRow(ids if usable else None, demo, usable and bool(crit), usable and ref is not None))
    return out


def conversation_tails(episodes: list, episode_of: list[int], turn_of: list[int]) -> list[list[int] | None]:
    """For each row (turn ``turn_of[b]`` of episode ``episode_of[b]``) of an agent episode (one with
    tool statistics), the ids of its prompt after the episode's first prompt: the earlier turns'
    sampled ids, tool calls and tool results, so that the teacher, whose own first prompt replaces
    the student's, re-scores the turn in the same conversation (token ids unchanged; the first
    prompt and the teacher's both end with the assistant header). None for other episodes' rows
    and for server engines (no prompt ids)."""
    out = []
    for e, k in zip(episode_of, turn_of):
        ep = episodes[e]
        agent = "tool_calls" in ep.stats and ep.turns[k].prompt_ids is not None
        out.append(ep.turns[k].prompt_ids[len(ep.turns[0].prompt_ids):] if agent else None)
    return out


def score(model, teacher_prompt_ids: list[list[int]], response_ids: list[list[int]],
          micro_batch: int = 8, topk: int = 0, temperature: float = 1.0):
    """The teacher's per-token log-probs of the student's response ids appended unchanged to the
    teacher prompts (no grad), the logits divided by ``temperature`` (the sampling temperature, as
    both references do for the teacher). Same return as :func:`agentopd.rl.logprobs.sequence_logprobs`."""
    with torch.no_grad():
        return sequence_logprobs(model, teacher_prompt_ids, response_ids, micro_batch, topk, temperature=temperature)


class _LogitMix(torch.nn.Module):
    """Logits ``(1 - c) * frozen + c * live``: the trust-region teacher, as a model for scoring (its
    hidden-state form is :meth:`Teacher.hidden`)."""

    def __init__(self, frozen, live, c: float):
        super().__init__()
        self.frozen, self.live, self.c = frozen, live, c

    def forward(self, **kw):
        if self.c == 0.0:
            return self.frozen(**kw)
        if self.c == 1.0:
            return self.live(**kw)
        logits = torch.lerp(self.frozen(**kw).logits.float(), self.live(**kw).logits.float(), self.c)
        return SimpleNamespace(logits=logits)


class Teacher:
    """The teacher's weights. ``ema``: a copy updated θT ← (1−τ)θT + τθ by :meth:`update`;
    ``frozen``: a copy of the initial weights; ``live``: the current student (no grad);
    ``trust_region``: log_softmax((1−mix)·frozen_logits + mix·live_logits).

    The copy shares the student's frozen parameters (with a peft/LoRA student: the whole base model)
    and holds its own copy of the trainable ones only, in their dtype (float32 master weights):
    with LoRA the teacher is an EMA of the adapter."""

    def __init__(self, student_model, mode: str = "ema", tau: float = 0.05, mix: float = 0.5):
        if mode not in TEACHER_MODES:
            raise ValueError(f"unknown teacher mode {mode!r}; expected one of {TEACHER_MODES}")
        self.mode, self.tau, self.mix = mode, tau, mix
        self.student = student_model
        self.copy = None
        if mode != "live":
            frozen = {id(p): p for p in student_model.parameters() if not p.requires_grad}
            self.copy = copy.deepcopy(student_model, memo=frozen).eval()  # frozen tensors shared, not copied
            for p in self.copy.parameters():
                p.requires_grad_(False)
                p.grad = None

    def model_for_scoring(self):
        if self.mode == "live":
            return self.student
        if self.mode == "trust_region":
            return _LogitMix(self.copy, self.student, self.mix)
        return self.copy

    def score(self, teacher_prompt_ids, response_ids, micro_batch: int = 8, topk: int = 0, temperature: float = 1.0):
        return score(self.model_for_scoring(), teacher_prompt_ids, response_ids, micro_batch, topk, temperature)

    def hidden(self, prompt_ids: list[list[int]], response_ids: list[list[int]]):
        """The final hidden states ``[B, R, H']`` at the response positions and the head ``[V, H']`` whose
        product is the teacher's logits (for divergences formed chunk by chunk). trust_region: both
        models side by side, ``(1 - mix) * frozen + mix * live`` logits as one product
        ``[(1 - mix) h_frozen, mix h_live] @ [W_frozen, W_live].T``."""
        if self.mode != "trust_region":
            model = self.model_for_scoring()
            return response_hidden(model, prompt_ids, response_ids), lm_head_weight(model)
        parts = [(c * response_hidden(m, prompt_ids, response_ids), lm_head_weight(m))
                 for m, c in ((self.copy, 1 - self.mix), (self.student, self.mix))]
        return torch.cat([h for h, _ in parts], -1), torch.cat([w for _, w in parts], -1)

    @torch.no_grad()
    def update(self, student_model=None):
        """Call after each optimizer step."""
        if student_model is not None:
            self.student = student_model
        if self.mode != "ema":
            return
        mine = dict(self.copy.named_parameters())
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                mine[name].lerp_(p.detach().to(mine[name].dtype), self.tau)
        mine_buffers = dict(self.copy.named_buffers())
        for name, b in self.student.named_buffers():
            mine_buffers[name].copy_(b)

    def own_parameters(self) -> dict[str, torch.Tensor]:
        """The copy's parameters that are not the student's (shared frozen ones left out)."""
        if self.copy is None:
            return {}
        shared = {id(p) for p in self.student.parameters()}
        return {n: p for n, p in self.copy.named_parameters() if id(p) not in shared}

    def state_dict(self) -> dict:
        """Settings and the teacher's own tensors (``model``: None in live mode)."""
        return {"mode": self.mode, "tau": self.tau, "mix": self.mix,
                "model": None if self.copy is None else {n: p.detach() for n, p in self.own_parameters().items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint teacher mode {state['mode']!r} != {self.mode!r}")
        self.tau, self.mix = state["tau"], state["mix"]
        mine = self.own_parameters()
        if self.copy is not None and set(state["model"]) != set(mine):
            raise ValueError(f"teacher tensors differ: {sorted(set(state['model']) ^ set(mine))[:5]}")
        for name, p in mine.items():
            p.copy_(state["model"][name])


class ModelTeacher:
    """A separate frozen teacher model (vanilla on-policy distillation): loaded once, never trained,
    no LoRA; it shares only the tokenizer with the student. The same interface as :class:`Teacher`
    (``copy`` is the model, so the distributed wrapper shards it as it shards a teacher copy)."""

    mode = "model"
    tau = mix = 0.0

    def __init__(self, model):
        self.copy = model.eval()
        for p in self.copy.parameters():
            p.requires_grad_(False)

    def model_for_scoring(self):
        return self.copy

    def score(self, teacher_prompt_ids, response_ids, micro_batch: int = 8, topk: int = 0, temperature: float = 1.0):
        return score(self.copy, teacher_prompt_ids, response_ids, micro_batch, topk, temperature)

    def hidden(self, prompt_ids: list[list[int]], response_ids: list[list[int]]):
        """As :meth:`Teacher.hidden`: the model's final hidden states and its head."""
        return response_hidden(self.copy, prompt_ids, response_ids), lm_head_weight(self.copy)

    def update(self, student_model=None) -> None:
        """Nothing: the teacher model never changes."""

    def own_parameters(self) -> dict[str, torch.Tensor]:
        return {}  # reloaded from its path on resume, not checkpointed

    def state_dict(self) -> dict:
        return {"mode": self.mode, "tau": 0.0, "mix": 0.0, "model": None}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint teacher mode {state['mode']!r} != {self.mode!r}")


def tokenizer_mismatch(student_tok, teacher_tok) -> str | None:
    """What differs between two tokenizers for token-level distillation (the vocabulary, added
    special tokens included, or the begin/end tokens' ids; padding never reaches a score), in a few
    words; None when they match."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        differ = sum(tv.get(t) != i for t, i in sv.items()) + len(set(tv) - set(sv))
        return f"vocabularies differ ({len(sv)} vs {len(tv)} tokens, {differ} differ)"
    for name in ("bos_token_id", "eos_token_id"):
        a, b = getattr(student_tok, name, None), getattr(teacher_tok, name, None)
        if a != b:
            return f"{name} differs ({a} vs {b})"
    return None

"""The self-teacher: its context (prompt + critique [+ a successful sibling]), the scorer that reads
the student's SAME response ids under that context, and the teacher's weights (ema, frozen, live,
trust_region)."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from agentopd.inference.base import apply_chat
from agentopd.rl.logprobs import sequence_logprobs

TEACHER_MODES = ("ema", "frozen", "live", "trust_region")
_THINK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


@dataclass
class TeacherTemplate:
    """How the teacher's user message is built (the shape of lasgroup/SDPO's reprompt):
    ``prompt + demonstration block + feedback block + instruction``. A block is left out when its
    text is None."""

    demonstration: str = "\n\nCorrect solution:\n\n{demonstration}"
    feedback: str = "\n\nThe following is feedback from your unsuccessful earlier attempt:\n\n{critique}"
    instruction: str = "\n\nCorrectly solve the original question.\n"
    system: str | None = None

    def render(self, prompt: str, critique: str | None, demonstration: str | None) -> str:
        text = prompt
        if demonstration is not None:
            text += self.demonstration.format(demonstration=demonstration)
        if critique is not None:
            text += self.feedback.format(critique=critique)
        return text + self.instruction

    def messages(self, prompt: str, critique: str | None, demonstration: str | None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.render(prompt, critique, demonstration)}]


def _truncate(tokenizer, text: str | None, n_tokens: int) -> str | None:
    if text is None:
        return None
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= n_tokens else tokenizer.decode(ids[:max(n_tokens, 0)])


def build_teacher_context(tokenizer, prompt: str, critique: str | None, demonstration: str | None,
                          template: TeacherTemplate | None = None,
                          max_tokens: int = 4096) -> list[int] | None:
    """The teacher PROMPT ids (chat template applied, assistant header at the end), or None when there
    is neither critique nor demonstration (no signal: the sample is masked) or when even empty
    critique/demonstration blocks do not fit ``max_tokens``. Only the critique and demonstration texts
    are cut to fit, never the prompt, the template or the assistant header."""
    template = template or TeacherTemplate()
    critique = critique or None
    if critique is None and demonstration is None:
        return None
    ids = apply_chat(tokenizer, template.messages(prompt, critique, demonstration))
    if len(ids) <= max_tokens:
        return ids
    base = len(apply_chat(tokenizer, template.messages(prompt, None if critique is None else "",
                                                         None if demonstration is None else "")))
    budget = max_tokens - base
    if budget < 0:
        return None
    n_demo = 0 if demonstration is None else len(tokenizer.encode(demonstration, add_special_tokens=False))
    n_crit = 0 if critique is None else len(tokenizer.encode(critique, add_special_tokens=False))
    while budget >= 0:
        # split the budget evenly; what one text does not need goes to the other
        half = budget // 2 if (critique and demonstration) else budget
        keep_crit = min(n_crit, max(half, budget - n_demo))
        keep_demo = min(n_demo, budget - keep_crit)
        ids = apply_chat(tokenizer, template.messages(prompt, _truncate(tokenizer, critique, keep_crit),
                                                      _truncate(tokenizer, demonstration, keep_demo)))
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
    demonstration shown and whether the critique was shown."""

    ids: list[int] | None
    demonstration: str | None
    critique_shown: bool


def teacher_contexts(tokenizer, prompts: list[str], samples: list, judgements: list, group_size: int,
                     cfg, template: TeacherTemplate | None = None) -> list[list[int] | None]:
    """The teacher prompt ids of every sample of a single-turn step, exactly as training builds them:
    sample ``b`` answers ``prompts[b // group_size]``; ``samples[b]`` has ``.text`` and
    ``.response_ids``; ``judgements[b]`` its Judgement. See :func:`context_rows`."""
    return [r.ids for r in context_rows(tokenizer, prompts, samples, judgements, group_size, cfg, template)]


def context_rows(tokenizer, prompts: list[str], samples: list, judgements: list, group_size: int, cfg,
                 template: TeacherTemplate | None = None, episode_of: list[int] | None = None,
                 finals: list[tuple[str, bool]] | None = None) -> list[ContextRow]:
    """Each row's teacher context. Row ``b`` is a turn of episode ``episode_of[b]`` (default: ``b``,
    one turn each), which answers ``prompts[episode // group_size]``. A failed turn gets the critique
    that followed it (``cfg.use_critique``: hindsight), any turn the final answer of the first other
    successful episode of its group as demonstration (``finals[e]``: episode ``e``'s last answer and
    success; ``cfg.use_demonstration``; with ``cfg.self_demonstration`` the first successful one,
    itself included), without its ``<think>`` blocks with ``cfg.strip_think``;
    ``cfg.drop_critique_with_demo`` leaves the critique out where there is a demonstration. No
    signal (neither text, an empty response or a judge error): ``ids`` None. ``cfg``: a ``TeacherConfig``."""
    ok = [j.verdict.status == "ok" for j in judgements]
    episode_of = list(range(len(samples))) if episode_of is None else episode_of
    finals = [(g.text, s) for g, s in zip(samples, ok)] if finals is None else finals
    out = []
    for b, (g, j) in enumerate(zip(samples, judgements)):
        e = episode_of[b]
        i = e // group_size
        group = finals[i * group_size:(i + 1) * group_size]
        demo = (pick_demonstration(group, e - i * group_size, cfg.self_demonstration)
                if cfg.use_demonstration else None)
        if demo is not None and cfg.strip_think:
            demo = strip_think(demo)
        dropped = demo is not None and cfg.drop_critique_with_demo
        crit = j.critique if cfg.use_critique and not ok[b] and not dropped else None
        ids = build_teacher_context(tokenizer, prompts[i], crit, demo, template, cfg.max_tokens)
        usable = ids is not None and len(g.response_ids) > 0 and j.verdict.status != "judge_error"
        out.append(ContextRow(ids if usable else None, demo, usable and crit is not None))
    return out


def score(model, teacher_prompt_ids: list[list[int]], response_ids: list[list[int]],
          micro_batch: int = 8, topk: int = 0, temperature: float = 1.0):
    """The teacher's per-token log-probs of the student's response ids appended unchanged to the
    teacher prompts (no grad), the logits divided by ``temperature`` (the sampling temperature, as
    both references do for the teacher). Same return as :func:`agentopd.rl.logprobs.sequence_logprobs`."""
    with torch.no_grad():
        return sequence_logprobs(model, teacher_prompt_ids, response_ids, micro_batch, topk, temperature=temperature)


class _LogitMix(torch.nn.Module):
    """Logits ``(1 - c) * frozen + c * live``: the trust-region teacher, as a model for scoring."""

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

"""The micro testbed: a Llama of a few million parameters and a locally trained tokenizer, warm-started
by supervised learning so that RL from critiques has room to learn on 2 CPU cores.

The warm start mixes (deterministic in the seed):

- multi-digit arithmetic (``envs.procedural.micro_problems``), answered column by column then
  ``\\boxed{<value>}``;
- functions specified by examples (``envs.procedural.function_problems``), answered with a fenced
  ``def f``, whose reference solutions are checked by the test judge in the real sandbox;
- feedback-conditioned repairs: a wrong attempt, its critique from the real judge (math-verify or
  sandboxed tests), then the correct answer, both in the self-teacher's template (critique and/or a
  correct sibling as demonstration) and as a multi-turn conversation (the RLEF shape).

Held-out problems (``heldout_problems``) are drawn from another seed and removed from the warm-start
data, so the pass@1 measured on them is on unseen questions.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch

from agentopd.envs.procedural import (
    AMBIGUOUS,
    HELDOUT_SEED,
    LIST_OPS,
    function_problems,
    function_solution,
    generated_problems,
    micro_problems,
    micro_solution,
)
from agentopd.types import Problem

SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "micro_model")
"""The warm-started micro model shipped with the package (``MicroConfig()``'s defaults, seed 0:
``agentopd micro pretrain --out agentopd/testbed/micro_model`` rebuilds it); what ``model.path: micro`` loads."""
TEACHER_DIR = os.path.join(os.path.dirname(__file__), "micro_teacher")
"""The shipped stronger micro teacher (same tokenizer; see :func:`agentopd.testbed.teacher.build_teacher`): what
``teacher.model: micro-teacher`` loads."""
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "agentopd", "micro")
"""Where ``agentopd micro pretrain`` writes by default, and what ``micro`` falls back to (built
when missing) if a checkout has no shipped model."""


@dataclass
class MicroConfig:
    """The micro model and its warm start."""

    seed: int = 0
    """Seeds the data, the tokenizer corpus and the weights."""
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    vocab_size: int = 512
    """Tokenizer vocabulary (byte-level BPE; digits are always single tokens)."""
    levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Arithmetic levels in the warm start and the held-out set (see ``micro_problems``)."""
    n_math: int = 6000
    """Generated arithmetic problems for the warm start."""
    n_code: int = 4000
    """Generated example-specified functions for the warm start."""
    repair_fraction: float = 0.7
    """Share of problems that also give a repair example (wrong attempt, critique, correct answer)."""
    steps: int = 2500
    """Optimizer steps of supervised learning."""
    batch: int = 32
    lr: float = 1.5e-3
    heldout: int = 100
    """Held-out problems per kind for the warm-start pass@1."""


# ----------------------------------------------------------------------------- problem families


def answer(problem: Problem) -> str:
    return micro_solution(problem) if problem.kind == "math" else function_solution(problem)


def _wrong_math(problem: Problem, r: random.Random) -> str:
    """A wrong attempt: half the time a slip in one column that the boxed value carries, else a wrong
    boxed value after a correct scratchpad."""
    value = int(problem.payload["answer"])
    if r.random() < 0.5:
        steps, tail = micro_solution(problem).rsplit(". ", 1)
        parts = steps.split(", ")
        k = r.randrange(len(parts))
        lhs, got = parts[k].rsplit(" = ", 1)
        delta = r.choice([-1, 1])
        parts[k] = f"{lhs} = {max(int(got) + delta, 0)}"
        return ", ".join(parts) + f". \\boxed{{{value + delta * 10 ** k}}}"
    return micro_solution(problem, value + r.choice([-10, -2, -1, 1, 2, 10, r.randint(-99, 99) or 3]))


def _wrong_code(problem: Problem, r: random.Random) -> str:
    """A wrong attempt: for an ambiguous list problem the other reading of its examples, else a
    nearby affine map or another list operation."""
    sol = problem.privileged["solution"]
    head, body = sol.split("return ")
    other = [b for pair in AMBIGUOUS if body in pair for b in pair if b != body]
    if other and r.random() < 0.8:
        body = other[0]
    elif "x" in body and "xs" not in head:
        body = r.choice(["x", "2 * x", f"x + {r.randint(1, 9)}", "-x", f"3 * x - {r.randint(1, 9)}"])
    else:
        body = r.choice([b for b, _ in LIST_OPS if b != body])
    return f"```python\n{head}return {body}\n```"


def heldout_problems(kind: str, n: int, levels=(1, 2, 3)) -> list[Problem]:
    """Held-out problems of the micro task: the same ones ``run.eval_problems`` measures in training."""
    return generated_problems("micro" if kind == "math" else "functions", n, levels, HELDOUT_SEED)


# ------------------------------------------------------------------------------------- the data


def _judge_all(pairs: list[tuple[Problem, str]]) -> list:
    """Judgements of (problem, response) pairs by the real judges: math-verify (critiques that name
    the expected answer) and the test judge in the sandbox."""
    from agentopd.judges import make_judge

    out = [None] * len(pairs)
    for kind, judge in (("math", make_judge("math", reveal_answer=True)), ("code", make_judge("tests"))):
        try:
            idx = [i for i, (p, _) in enumerate(pairs) if p.kind == kind]
            for i, j in zip(idx, judge.judge_many([pairs[i] for i in idx])):
                out[i] = j
        finally:
            judge.close()
    return out


def _repair_messages(p: Problem, wrong: str, critique: str, right_critique: str, shape: int, template) -> list[dict]:
    """The context of a repair example, by shape: 0 critique, 1 demonstration, 2 both (the
    self-teacher's template), 3 the multi-turn conversation (RLEF), 4 the critique of the correct
    answer itself (a success critique: keep the answer)."""
    if shape == 3:
        return [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": wrong},
                {"role": "user", "content": critique}]
    if shape == 4:
        return template.messages(p.prompt, right_critique, None)
    return template.messages(p.prompt, critique if shape in (0, 2) else None, answer(p) if shape in (1, 2) else None)


def warm_start_examples(cfg: MicroConfig) -> list[tuple[list[dict], str]]:
    """(messages, target) pairs; the target is the assistant's reply to ``messages``."""
    from agentopd.rl.teacher import TeacherTemplate

    held = {p.prompt for kind in ("math", "code") for p in heldout_problems(kind, cfg.heldout, cfg.levels)}
    math_p = [p for p in micro_problems(cfg.n_math, tuple(cfg.levels), cfg.seed) if p.prompt not in held]
    code_p = [p for p in function_problems(cfg.n_code, cfg.seed + 1, convention=False) if p.prompt not in held]
    r = random.Random(cfg.seed)
    examples = [([{"role": "user", "content": p.prompt}], answer(p)) for p in math_p + code_p]
    repairs = [p for p in math_p + code_p if r.random() < cfg.repair_fraction]
    wrong = [_wrong_math(p, r) if p.kind == "math" else _wrong_code(p, r) for p in repairs]
    judged = _judge_all([(p, w) for p, w in zip(repairs, wrong)] + [(p, answer(p)) for p in repairs + code_p])
    bad = [p.id for p, j in zip(repairs + code_p, judged[len(repairs):]) if j.verdict.status != "ok"]
    if bad:  # every reference solution must pass its own tests in the sandbox
        raise RuntimeError(f"reference solutions fail their tests: {bad[:5]}")
    template = TeacherTemplate()
    for i, p in enumerate(repairs):
        if judged[i].verdict.status == "ok":  # a perturbation that happens to be right
            continue
        msgs = _repair_messages(p, wrong[i], judged[i].critique, judged[len(repairs) + i].critique,
                                r.randrange(5), template)
        examples.append((msgs, answer(p)))
    r.shuffle(examples)
    return examples


# ---------------------------------------------------------------------------------- the model


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on ``texts``, merging across spaces (the boilerplate of prompts and
    templates becomes a few tokens); digits are always split one per token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from agentopd.testbed.tiny import (
        BOS,
        CHAT_TEMPLATE,
        EOS,
        IM_START,
        PAD,
        SPECIAL_TOKENS,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=None, additional_special_tokens=[IM_START, "<|endoftext|>"],
                                   chat_template=CHAT_TEMPLATE, model_max_length=1024)


def build_model(tokenizer, cfg: MicroConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.heads, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, k, getattr(config, k))
    return model


def _encode(tok, examples) -> list[tuple[list[int], int]]:
    """(ids, n_prompt): the chat-rendered prompt then the target and end-of-turn token."""
    from agentopd.inference.base import apply_chat

    out = []
    for msgs, target in examples:
        p = apply_chat(tok, msgs)
        out.append((p + tok.encode(target, add_special_tokens=False) + [tok.eos_token_id], len(p)))
    return out


def sft(model, rows: list[tuple[list[int], int]], steps: int, batch: int, lr: float, seed: int,
        pad_id: int, progress: bool = True) -> list[float]:
    """Supervised learning on the target tokens only (AdamW, warm-up then cosine decay)."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    # batches of similar length (sorted, cut into runs of ``batch``), so little compute goes to padding
    by_len = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    batches = [by_len[s:s + batch] for s in range(0, len(by_len), batch)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="micro warm start", disable=not progress)
    for _ in bar:
        pick = batches[int(torch.randint(len(batches), (1,), generator=g))]
        T = max(len(rows[i][0]) for i in pick)
        ids_BT = torch.full((len(pick), T), pad_id, dtype=torch.long)
        labels_BT = torch.full((len(pick), T), -100, dtype=torch.long)
        mask_BT = torch.zeros((len(pick), T), dtype=torch.long)
        for b, i in enumerate(pick):
            ids, n_prompt = rows[i]
            ids_BT[b, :len(ids)] = torch.tensor(ids)
            labels_BT[b, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
            mask_BT[b, :len(ids)] = 1
        loss = model(input_ids=ids_BT, attention_mask=mask_BT, labels=labels_BT).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


def pretrain(out: str, cfg: MicroConfig | None = None, progress: bool = True) -> dict:
    """Build, warm-start and save the micro model under ``out``; returns the summary also written to
    ``out/micro.json`` (config, losses, held-out pass@1 per kind at temperature 1, seconds)."""
    from agentopd.config import SamplingConfig
    from agentopd.eval.heldout import heldout_pass1
    from agentopd.inference.hf import HFEngine
    from agentopd.judges import make_judge

    cfg = cfg or MicroConfig()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    examples = warm_start_examples(cfg)
    corpus = ([m["content"] for msgs, _ in examples[:3000] for m in msgs] + [t for _, t in examples[:3000]]
              + ["user\n", "assistant\n", "system\n"] * 100)
    tok = build_tokenizer(corpus, cfg.vocab_size)
    model = build_model(tok, cfg)
    rows = _encode(tok, examples)
    t_data = time.perf_counter() - t0
    losses = sft(model, rows, cfg.steps, cfg.batch, cfg.lr, cfg.seed, tok.pad_token_id, progress)
    t_sft = time.perf_counter() - t0 - t_data
    heldout, engine = {}, HFEngine(model, tok)
    for kind, judge in (("math", make_judge("math")), ("code", make_judge("tests"))):
        try:
            heldout[kind] = heldout_pass1(engine, tok, heldout_problems(kind, cfg.heldout, cfg.levels), judge,
                                          4, SamplingConfig(max_new_tokens=48), cfg.seed)
        finally:
            judge.close()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    summary = {"config": asdict(cfg), "params": sum(p.numel() for p in model.parameters()),
               "examples": len(examples), "final_loss": sum(losses[-50:]) / len(losses[-50:]),
               "heldout_pass1": heldout, "seconds": {"data": t_data, "sft": t_sft,
                                                      "total": time.perf_counter() - t0}}
    with open(os.path.join(out, "micro.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def ensure(path: str | None = None, progress: bool = True) -> str:
    """The warm-start checkpoint directory: ``path``, else the shipped model, else ``DEFAULT_DIR``;
    created first when missing."""
    if path is None and os.path.exists(os.path.join(SHIPPED_DIR, "micro.json")):
        return SHIPPED_DIR
    path = path or DEFAULT_DIR
    if not os.path.exists(os.path.join(path, "micro.json")):
        pretrain(path, progress=progress)
    return path


"""Engines sample answers as token ids with their sampling log-probs; ``sequence_logprobs`` rescores
given token ids. Token ids are the source of truth: nothing here decodes and re-tokenizes a response.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from agentopd.losses import tempered_logp, token_logprobs_chunked


@dataclass
class Generation:
    response_ids: list[int]  # sampled ids (eos included if sampled; nothing after a stop)
    logprobs: list[float]  # log-prob of each id under the distribution it was drawn from
    text: str  # decode(response_ids, skip_special_tokens=True), for judges only
    finish_reason: str  # "stop" (eos or stop string) or "length"


class Engine(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int = 1, max_new_tokens: int = 256,
                 temperature: float = 1.0, top_p: float = 1.0, stop: list[str] | None = None,
                 seed: int | None = None) -> list[list[Generation]]:
        """``n`` samples for each prompt: ``result[prompt][sample]``."""
        ...


def apply_chat(tokenizer, messages: list[dict]) -> list[int]:
    """The chat template applied to ``messages`` with the generation prompt (assistant header) added."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    return list(out["input_ids"])


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _pad_left(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, both [B, L]."""
    L = max(len(r) for r in rows)
    ids_BL = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask_BL = torch.zeros((len(rows), L), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids_BL[b, L - len(r):] = torch.tensor(r)
            mask_BL[b, L - len(r):] = 1
    return ids_BL.to(device), mask_BL.to(device)


def _positions(mask_BL: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding: the first real token of every row is at 0."""
    return (mask_BL.cumsum(-1) - 1).clamp(min=0)


def _response_rows(model, prompt_ids: list[list[int]], response_ids: list[list[int]]):
    """Rows laid out as ``[pad.. prompt | response ..pad]`` (every response starts at the same column):
    the forward's keyword arguments on the model's device, and the longest response's length."""
    assert all(len(p) > 0 for p in prompt_ids), "every prompt needs at least one token"
    Pmax, Rmax = max(len(p) for p in prompt_ids), max(len(r) for r in response_ids)
    ids_BT = torch.zeros((len(prompt_ids), Pmax + Rmax), dtype=torch.long)
    mask_BT = torch.zeros_like(ids_BT)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids_BT[b, Pmax - len(p):Pmax + len(r)] = torch.tensor(p + r)
        mask_BT[b, Pmax - len(p):Pmax + len(r)] = 1
    ids_BT, mask_BT = ids_BT.to(_device_of(model)), mask_BT.to(_device_of(model))
    return {"input_ids": ids_BT, "attention_mask": mask_BT, "position_ids": _positions(mask_BT), "use_cache": False}, Rmax


def response_logits(model, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
    """One forward over rows laid out as ``[pad.. prompt | response ..pad]``; returns the logits that
    predict each response token, ``[B, Rmax, V]`` (only those positions are computed, via
    ``logits_to_keep``). Works with or without grad."""
    kw, Rmax = _response_rows(model, prompt_ids, response_ids)
    # logits at columns Pmax-1 .. Pmax+Rmax-2 predict the response tokens
    return model(**kw, logits_to_keep=Rmax + 1).logits[:, :-1]


def _causal_lm(model):
    """The transformers causal LM inside a peft wrapper (LoRA layers are injected in place), or ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_weight(model) -> torch.Tensor | None:
    """The ``[V, H]`` weight ``W`` with ``logits == hidden @ W.T`` for the final hidden states of
    :func:`response_hidden`, or None where the logits are not that (no decoder/head accessors, a
    head with a bias or adapters, logit scaling or soft-capping)."""
    lm = _causal_lm(model)
    if not (hasattr(lm, "get_decoder") and hasattr(lm, "get_output_embeddings")):
        return None
    head, config = lm.get_output_embeddings(), getattr(lm, "config", None)
    scaled = any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return head.weight if type(head) is torch.nn.Linear and head.bias is None and not scaled else None


def response_hidden(model, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
    """As :func:`response_logits`, but the final hidden states (the decoder's output, the lm head
    left out): ``[B, Rmax, H]``; the logits are ``hidden @ lm_head_weight(model).T``."""
    kw, Rmax = _response_rows(model, prompt_ids, response_ids)
    hidden_BTH = _causal_lm(model).get_decoder()(**kw).last_hidden_state
    return hidden_BTH[:, hidden_BTH.shape[1] - Rmax - 1:-1]


def gather_logprobs(logits_BRV: torch.Tensor, response_ids: list[list[int]],
                    temperature: float = 1.0) -> list[torch.Tensor]:
    """Float32 log-probs of each row's response ids under ``log_softmax(logits_BRV / temperature)``
    (the distribution the engine samples from at that temperature, before top-p); a 1-D tensor per row."""
    logp_BRV = tempered_logp(logits_BRV, temperature)
    target_BR = torch.zeros(logp_BRV.shape[:2], dtype=torch.long, device=logp_BRV.device)
    for b, r in enumerate(response_ids):
        target_BR[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    lp_BR = logp_BRV.gather(-1, target_BR.unsqueeze(-1)).squeeze(-1)
    return [lp_BR[b, :len(r)] for b, r in enumerate(response_ids)]


def hidden_logprobs(hidden_BRH: torch.Tensor, head_VH: torch.Tensor, response_ids: list[list[int]],
                    chunk: int = 128, topk: int = 0, temperature: float = 1.0):
    """:func:`gather_logprobs` of the logits ``hidden_BRH @ head_VH.T`` (divided by ``temperature``),
    formed ``chunk`` response positions at a time (with grad, each chunk is recomputed in backward),
    so that no ``[B, R, V]`` tensor is ever held. Returns ``(logprobs, topk)`` as
    :func:`sequence_logprobs` does."""
    lens = [len(r) for r in response_ids]
    hidden_NH = torch.cat([hidden_BRH[b, :n] for b, n in enumerate(lens)])
    target_N = torch.tensor([t for r in response_ids for t in r], dtype=torch.long, device=hidden_NH.device)
    lp_N, top_NK = token_logprobs_chunked(hidden_NH, head_VH, target_N, chunk, topk, temperature)
    return list(lp_N.split(lens)), (tuple(list(x.split(lens)) for x in top_NK) if topk else None)


def sequence_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]],
                      micro_batch: int = 8, topk: int = 0, chunk: int = 128, temperature: float = 1.0):
    """Per-token log-probs of ``response_ids[i]`` given ``prompt_ids[i]``: one forward per micro-batch
    (see :func:`response_logits`). Works with grad enabled (the learner) or under
    ``torch.no_grad`` (teachers). Returns ``(logprobs, topk)``: ``logprobs`` a list of 1-D float32
    tensors (one per row, len == len(response_ids[i])) on the model's device; ``topk`` ``None`` or
    ``(values, indices)``, two lists of ``[len_i, K]`` tensors, the K largest log-probs of the full
    distribution at each response position. ``chunk``: logits are formed from the final hidden
    states this many positions at a time (:func:`hidden_logprobs`) where :func:`lm_head_weight`
    allows; 0: the ``[B, R, V]`` logits of each micro-batch at once. ``temperature`` divides the
    logits first (the sampling temperature: the log-probs of the distribution sampled from).
    """
    device = _device_of(model)
    head_VH = lm_head_weight(model) if chunk else None
    logprobs, top_vals, top_idx = [], [], []
    for s in range(0, len(prompt_ids), micro_batch):
        P, R = prompt_ids[s:s + micro_batch], response_ids[s:s + micro_batch]
        if max(len(r) for r in R) == 0:
            logprobs += [torch.zeros(0, device=device) for _ in P]
            top_vals += [torch.zeros(0, topk, device=device) for _ in P]
            top_idx += [torch.zeros(0, topk, dtype=torch.long, device=device) for _ in P]
            continue
        if head_VH is not None:
            lps, top = hidden_logprobs(response_hidden(model, P, R), head_VH, R, chunk, topk, temperature)
        else:
            logits_BRV = response_logits(model, P, R)
            lps, top = gather_logprobs(logits_BRV, R, temperature), None
            if topk:
                vals_BRK, idx_BRK = tempered_logp(logits_BRV, temperature).topk(topk, dim=-1)
                top = ([vals_BRK[b, :len(r)] for b, r in enumerate(R)], [idx_BRK[b, :len(r)] for b, r in enumerate(R)])
        logprobs += lps
        if topk:
            top_vals += top[0]
            top_idx += top[1]
    return logprobs, ((top_vals, top_idx) if topk else None)


def _top_p_filter(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p``; others get -inf."""
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    probs_BV = sorted_BV.softmax(-1)
    drop_BV = probs_BV.cumsum(-1) - probs_BV >= top_p  # mass before this token already reaches top_p
    drop_BV[:, 0] = False
    sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
    return torch.full_like(logits_BV, float("-inf")).scatter(-1, order_BV, sorted_BV)


def _kv_cache(model) -> dict:
    """A fresh ``DynamicCache`` under the name the model's forward takes: ``cache`` (transformers
    >= 5.24, which deprecates ``past_key_values``), else ``past_key_values``."""
    import inspect

    from transformers import DynamicCache

    lm = _causal_lm(model)
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    try:  # with the config: sliding-window layers get their own kind of cache
        return {name: DynamicCache(config=lm.config)}
    except TypeError:  # transformers before 4.56
        return {name: DynamicCache()}


class HFEngine:
    """Batched sampling with a transformers causal LM: left padding, KV cache, a hand sampling loop
    (so the log-prob of each id is exactly that of the distribution it was drawn from).

    ``temperature == 0`` is greedy; its ``logprobs`` are then the untempered model log-probs (the
    greedy point mass would give only zeros)."""

    def __init__(self, model, tokenizer, device=None, batch_size: int = 32):
        if device is not None:
            model.to(device)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = _device_of(model)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]

    def generate(self, prompt_ids, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop=None,
                 seed=None):
        rows = [list(p) for p in prompt_ids for _ in range(n)]
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                flat = []
                for s in range(0, len(rows), self.batch_size):
                    flat += self._generate_batch(rows[s:s + self.batch_size], max_new_tokens,
                                                 temperature, top_p, stop or [], gen)
        finally:
            self.model.train(was_training)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def _pick(self, logits_BV, temperature, top_p, gen):
        """The next token of every row and its log-prob under the distribution it was drawn from."""
        logits_BV = logits_BV.float()
        if temperature == 0:
            tok_B = logits_BV.argmax(-1)
            return tok_B, logits_BV.log_softmax(-1).gather(-1, tok_B[:, None]).squeeze(-1)
        logits_BV = logits_BV / temperature
        if top_p < 1.0:
            logits_BV = _top_p_filter(logits_BV, top_p)
        logp_BV = logits_BV.log_softmax(-1)
        tok_B = torch.multinomial(logp_BV.exp(), 1, generator=gen).squeeze(-1)
        return tok_B, logp_BV.gather(-1, tok_B[:, None]).squeeze(-1)

    def _stop_hits(self, tails: list[list[int]], stop: list[str]) -> list[bool]:
        # checked after every token, so a stop string seen in a tail was completed by its last id
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return [any(s in t for s in stop) for t in texts]

    def _generate_batch(self, rows, max_new_tokens, temperature, top_p, stop, gen):
        """Finished-row bookkeeping stays on the device (one host sync per token, for "all rows
        finished?", as in ``model.generate``; with stop strings, the newest ids instead, and only the
        unfinished rows' tails decoded, in one batch call); ids and log-probs go into preallocated
        ``[B, max_new_tokens]`` tensors. Finished rows are fed the pad id (rows are independent)."""
        B, dev = len(rows), self.device
        ids_BL, mask_BL = _pad_left(rows, self.pad_id, dev)
        L = ids_BL.shape[1]
        pos_B1 = _positions(mask_BL)[:, -1:]
        mask_BT = torch.ones((B, L + max_new_tokens), dtype=mask_BL.dtype, device=dev)
        mask_BT[:, :L] = mask_BL
        cache = _kv_cache(self.model)  # filled in place by every forward
        out = self.model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=_positions(mask_BL),
                         use_cache=True, logits_to_keep=1, **cache)
        window = 4 * max((len(s) for s in stop), default=0) + 8  # a token carries >= 1 byte
        eos_E = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=dev)
        resp_BT = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        lp_BT = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=dev)
        len_B = torch.zeros(B, dtype=torch.long, device=dev)
        done_B = torch.zeros(B, dtype=torch.bool, device=dev)
        hist = [[] for _ in range(B)] if stop else None  # host copies of the rows' ids, for stop strings
        live = list(range(B))  # unfinished rows (host side; kept up to date only with stop strings)
        for step in range(max_new_tokens):
            tok_B, lp_B = self._pick(out.logits[:, -1], temperature, top_p, gen)
            active_B = ~done_B
            resp_BT[:, step] = tok_B
            lp_BT[:, step] = lp_B
            len_B += active_B
            hit_B = active_B & torch.isin(tok_B, eos_E)
            if stop:
                toks = tok_B.tolist()
                for b in live:
                    hist[b].append(toks[b])
                hits = self._stop_hits([hist[b][-window:] for b in live], stop)
                stopped = [b for b, h in zip(live, hits) if h]
                if stopped:
                    hit_B[torch.tensor(stopped, device=dev)] = True
                live = [b for b, h in zip(live, hits) if not h and toks[b] not in self.eos_ids]
            done_B |= hit_B
            if step == max_new_tokens - 1 or (not live if stop else bool(done_B.all())):
                break
            pos_B1 = pos_B1 + 1
            out = self.model(input_ids=tok_B.masked_fill(done_B, self.pad_id)[:, None],
                             attention_mask=mask_BT[:, :L + step + 1], position_ids=pos_B1,
                             use_cache=True, logits_to_keep=1, **cache)
        lens, done = len_B.tolist(), done_B.tolist()
        resp = [r[:k] for r, k in zip(resp_BT.tolist(), lens)]
        lps = [r[:k] for r, k in zip(lp_BT.tolist(), lens)]
        texts = self.tokenizer.batch_decode(resp, skip_special_tokens=True)
        return [Generation(response_ids=resp[b], logprobs=lps[b], text=texts[b],
                           finish_reason="stop" if done[b] else "length") for b in range(B)]

"""Per-token log-probs of given token ids under a model: the forward passes behind scoring (student,
teacher, reference) and the update. Token ids are the source of truth: nothing here decodes and
re-tokenizes a response."""
from __future__ import annotations

import torch

from agentopd.rl.losses import tempered_logp, token_logprobs_chunked


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def pad_left(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, both [B, L]."""
    L = max(len(r) for r in rows)
    ids_BL = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask_BL = torch.zeros((len(rows), L), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids_BL[b, L - len(r):] = torch.tensor(r)
            mask_BL[b, L - len(r):] = 1
    return ids_BL.to(device), mask_BL.to(device)


def positions(mask_BL: torch.Tensor) -> torch.Tensor:
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
    ids_BT, mask_BT = ids_BT.to(device_of(model)), mask_BT.to(device_of(model))
    return {"input_ids": ids_BT, "attention_mask": mask_BT, "position_ids": positions(mask_BT), "use_cache": False}, Rmax


ROOTS = "_agentopd_roots"
"""Key in a model's ``__dict__`` (not a submodule): ``(with grad, without grad)``, the modules its
forward passes go through when :mod:`agentopd.rl.distributed` wrapped it (None: a plain Scorer)."""


def causal_lm(model):
    """The transformers causal LM inside a peft wrapper (LoRA layers are injected in place), or ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


_causal_lm = causal_lm


def kv_cache(model) -> dict:
    """A fresh ``DynamicCache`` under the name the model's forward takes: ``cache`` (transformers
    >= 5.24, which deprecates ``past_key_values``), else ``past_key_values``."""
    import inspect

    from transformers import DynamicCache

    lm = causal_lm(model)
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    try:  # with the config: sliding-window layers get their own kind of cache
        return {name: DynamicCache(config=lm.config)}
    except TypeError:  # transformers before 4.56
        return {name: DynamicCache()}


class Scorer(torch.nn.Module):
    """A causal LM's learner forward as one module: the decoder's final hidden states ``[B, T, H]``
    (the head left to the chunked log-probs, see :func:`lm_head_weight`) or, with ``logits_to_keep``,
    the logits of the last that many positions. FSDP shards at this root (agentopd.rl.distributed),
    so every learner forward gathers the embeddings, final norm and head through its hooks."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, kw: dict, logits_to_keep: int = 0) -> torch.Tensor:
        if logits_to_keep:
            return self.lm(**kw, logits_to_keep=logits_to_keep).logits
        return causal_lm(self.lm).get_decoder()(**kw).last_hidden_state


def _root(model) -> torch.nn.Module:
    roots = model.__dict__.get(ROOTS)
    root = roots and roots[0 if torch.is_grad_enabled() else 1]
    return root if root is not None else Scorer(model)


def response_logits(model, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
    """One forward over rows laid out as ``[pad.. prompt | response ..pad]``; returns the logits that
    predict each response token, ``[B, Rmax, V]`` (only those positions are computed, via
    ``logits_to_keep``). Works with or without grad."""
    kw, Rmax = _response_rows(model, prompt_ids, response_ids)
    # logits at columns Pmax-1 .. Pmax+Rmax-2 predict the response tokens
    return _root(model)(kw, logits_to_keep=Rmax + 1)[:, :-1]


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
    left out): ``[B, Rmax, H]``; the logits are ``hidden @ lm_head_weight(model).T`` (under FSDP: the
    head as gathered by this forward, read after it)."""
    kw, Rmax = _response_rows(model, prompt_ids, response_ids)
    hidden_BTH = _root(model)(kw)
    return hidden_BTH[:, hidden_BTH.shape[1] - Rmax - 1:-1]


def distinct_rows(rows: list[list[int]], device=None) -> tuple[list[list[int]], torch.Tensor]:
    """The distinct ``rows`` in first-seen order and, per row, its index among them ``[B]``:
    ``distinct[row_B[b]] == rows[b]`` (a prompt forwarded once, its outputs repeated to its rows)."""
    where: dict[tuple, int] = {}
    row_B = torch.tensor([where.setdefault(tuple(r), len(where)) for r in rows], dtype=torch.long, device=device)
    return [list(r) for r in where], row_B


def shared_prefix_hidden(model, prompt_ids: list[list[int]], response_ids: list[list[int]]):
    """As :func:`response_hidden` for rows that repeat prompts (a group's teacher contexts share
    their demonstration): each distinct prompt is forwarded once (left-padded, KV cache kept), the
    cache repeated to the rows, then one forward over the responses (right-padded) on it. The same
    attention, positions and outputs as the one full forward, up to float rounding, with or without
    grad (the gradient reaches the prompt's forward through the repeated cache); where
    :func:`can_share_prefix`. ``[B, Rmax, H]``."""
    dev, Rmax = device_of(model), max(len(r) for r in response_ids)
    uniq, row_U = distinct_rows(prompt_ids, dev)
    ids_UP, mask_UP = pad_left(uniq, 0, dev)
    cache = kv_cache(model)
    decoder = causal_lm(model).get_decoder()
    hid_UPH = decoder(input_ids=ids_UP, attention_mask=mask_UP, position_ids=positions(mask_UP),
                      use_cache=True, **cache).last_hidden_state
    next(iter(cache.values())).reorder_cache(row_U)  # every row its prompt's keys and values
    ids_BR = torch.zeros((len(prompt_ids), Rmax), dtype=torch.long)
    mask_BR = torch.zeros_like(ids_BR)
    for b, r in enumerate(response_ids):
        ids_BR[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask_BR[b, :len(r)] = 1
    mask_BT = torch.cat([mask_UP[row_U], mask_BR.to(dev)], 1)
    pos_BR = positions(mask_BT)[:, -Rmax:]
    hid_BRH = decoder(input_ids=ids_BR.to(dev), attention_mask=mask_BT, position_ids=pos_BR,
                      use_cache=True, **cache).last_hidden_state
    return torch.cat([hid_UPH[row_U, -1:], hid_BRH[:, :-1]], 1)


def can_share_prefix(model, prompt_ids: list[list[int]]) -> bool:
    """:func:`shared_prefix_hidden` applies (and saves work): a plain model (no FSDP/DDP roots, no
    gradient checkpointing, which drops the cache) with a plain head and fewer distinct prompts than rows."""
    plain = (model.__dict__.get(ROOTS) is None and lm_head_weight(model) is not None
             and not getattr(causal_lm(model), "is_gradient_checkpointing", False))
    return plain and hasattr(causal_lm(model), "get_decoder") and len(set(map(tuple, prompt_ids))) < len(prompt_ids)


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
                      micro_batch: int = 8, topk: int = 0, chunk: int = 128, temperature: float = 1.0,
                      share_prefix: bool = False):
    """Per-token log-probs of ``response_ids[i]`` given ``prompt_ids[i]``: one forward per micro-batch
    (see :func:`response_logits`). Works with grad enabled (the learner) or under
    ``torch.no_grad`` (teachers). Returns ``(logprobs, topk)``: ``logprobs`` a list of 1-D float32
    tensors (one per row, len == len(response_ids[i])) on the model's device; ``topk`` ``None`` or
    ``(values, indices)``, two lists of ``[len_i, K]`` tensors, the K largest log-probs of the full
    distribution at each response position. ``chunk``: logits are formed from the final hidden
    states this many positions at a time (:func:`hidden_logprobs`) where :func:`lm_head_weight`
    allows; 0: the ``[B, R, V]`` logits of each micro-batch at once. ``temperature`` divides the
    logits first (the sampling temperature: the log-probs of the distribution sampled from).
    ``share_prefix``: a micro-batch's repeated prompts forwarded once (:func:`shared_prefix_hidden`),
    where :func:`can_share_prefix` allows.
    """
    device = device_of(model)
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
            shared = share_prefix and can_share_prefix(model, P)
            hidden_BRH = (shared_prefix_hidden if shared else response_hidden)(model, P, R)  # then the head (FSDP)
            lps, top = hidden_logprobs(hidden_BRH, lm_head_weight(model), R, chunk, topk, temperature)
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

"""The ``hf`` engine: batched sampling with a transformers causal LM in this process, token ids and
exact sampling log-probs out.

``seeds`` (one per sample): each sample draws its randomness from its own ``torch.Generator``
(Gumbel-max: the argmax of the log-probs plus that generator's Gumbel noise, an exact sample of the
same distribution), so a sample depends on its seed and prompt only, never on which other prompts
share its batch (a resumed evaluation samples what an uninterrupted one did). One ``seed`` for the
whole call (training) keeps one generator and ``torch.multinomial``."""
from __future__ import annotations

import math

import torch

from agentopd.inference.base import Engine
from agentopd.rl.logprobs import device_of, distinct_rows, kv_cache as _kv_cache, pad_left, positions
from agentopd.types import Generation


def _top_p_filter(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p``; others get -inf."""
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    probs_BV = sorted_BV.softmax(-1)
    drop_BV = probs_BV.cumsum(-1) - probs_BV >= top_p  # mass before this token already reaches top_p
    drop_BV[:, 0] = False
    sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
    return torch.full_like(logits_BV, float("-inf")).scatter(-1, order_BV, sorted_BV)


def _draw(logp_BV: torch.Tensor, gen) -> torch.Tensor:
    """One token per row from ``softmax(logp_BV)``: with one generator (or none) by
    ``torch.multinomial``; with a list, row ``b`` by Gumbel-max on ``gen[b]``'s noise alone."""
    if not isinstance(gen, list):
        return torch.multinomial(logp_BV.exp(), 1, generator=gen).squeeze(-1)
    V, dev = logp_BV.shape[-1], logp_BV.device
    u_BV = torch.stack([torch.rand(V, generator=g, device=dev) for g in gen])
    return (logp_BV - (-u_BV.log()).log()).argmax(-1)  # u = 0: noise -inf, never picked


class HFEngine(Engine):
    """Batched sampling with a transformers causal LM: left padding, KV cache, a hand sampling loop
    (so the log-prob of each id is exactly that of the distribution it was drawn from); a prompt
    sampled ``n`` times is forwarded once (:meth:`_prefill`).

    ``temperature == 0`` is greedy; its ``logprobs`` are then the untempered model log-probs (the
    greedy point mass would give only zeros)."""

    def __init__(self, model, tokenizer, device=None, batch_size: int = 32):
        if device is not None:
            model.to(device)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = device_of(model)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]

    def generate(self, prompt_ids, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop=None,
                 seed=None, seeds=None):
        """``seeds``: one per sample (``seeds[i * n + j]``: prompt ``i``'s sample ``j``), else ``seed``."""
        rows = [list(p) for p in prompt_ids for _ in range(n)]
        gen = None
        if seeds is not None:
            if len(seeds) != len(rows):
                raise ValueError(f"seeds: one per sample ({len(rows)}), got {len(seeds)}")
            gen = [torch.Generator(device=self.device).manual_seed(int(x)) for x in seeds]
        elif seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                flat = []
                for s in range(0, len(rows), self.batch_size):
                    flat += self._generate_batch(rows[s:s + self.batch_size], max_new_tokens,
                                                 temperature, top_p, stop or [],
                                                 gen[s:s + self.batch_size] if isinstance(gen, list) else gen)
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
        # a model whose logits are not finite (its weights diverged) samples uniformly, and the
        # log-prob it reports is NaN: the learner sees it and skips the update (agentopd.rl.guard)
        broken_B1 = torch.isnan(logp_BV).any(-1, keepdim=True)
        logp_BV = torch.where(broken_B1, -math.log(logp_BV.shape[-1]), logp_BV)
        tok_B = _draw(logp_BV, gen)
        return tok_B, logp_BV.gather(-1, tok_B[:, None]).squeeze(-1).masked_fill(broken_B1[:, 0], math.nan)

    def _stop_hits(self, tails: list[list[int]], stop: list[str]) -> list[bool]:
        # checked after every token, so a stop string seen in a tail was completed by its last id
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return [any(s in t for s in stop) for t in texts]

    def _prefill(self, rows):
        """The prompts' forward: ``(cache, last logits [B, 1, V], mask [B, L])``. Each distinct prompt
        is forwarded once (a group's ``n`` samples share theirs) and its KV cache and logits repeated
        to its rows: the same keys, values and logits as forwarding every row, up to float rounding."""
        uniq, row_B = distinct_rows(rows, self.device)
        ids_UL, mask_UL = pad_left(uniq, self.pad_id, self.device)
        cache = _kv_cache(self.model)  # filled in place by every forward
        logits_U1V = self.model(input_ids=ids_UL, attention_mask=mask_UL, position_ids=positions(mask_UL),
                                use_cache=True, logits_to_keep=1, **cache).logits
        if len(uniq) == len(rows):
            return cache, logits_U1V, mask_UL
        next(iter(cache.values())).reorder_cache(row_B)
        return cache, logits_U1V[row_B], mask_UL[row_B]

    def _generate_batch(self, rows, max_new_tokens, temperature, top_p, stop, gen):
        """Finished-row bookkeeping stays on the device (one host sync per token, for "all rows
        finished?", as in ``model.generate``; with stop strings, the newest ids instead, and only the
        unfinished rows' tails decoded, in one batch call); ids and log-probs go into preallocated
        ``[B, max_new_tokens]`` tensors. Finished rows are fed the pad id (rows are independent)."""
        B, dev = len(rows), self.device
        cache, logits_B1V, mask_BL = self._prefill(rows)
        L = mask_BL.shape[1]
        pos_B1 = positions(mask_BL)[:, -1:]
        mask_BT = torch.ones((B, L + max_new_tokens), dtype=mask_BL.dtype, device=dev)
        mask_BT[:, :L] = mask_BL
        # a stop string of b bytes ends within the last b tokens (a token carries >= 1 byte), +8 for context
        window = max((len(s.encode("utf-8")) for s in stop), default=0) + 8
        eos_E = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=dev)
        resp_BT = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        lp_BT = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=dev)
        len_B = torch.zeros(B, dtype=torch.long, device=dev)
        done_B = torch.zeros(B, dtype=torch.bool, device=dev)
        hist = [[] for _ in range(B)] if stop else None  # host copies of the rows' ids, for stop strings
        live = list(range(B))  # unfinished rows (host side; kept up to date only with stop strings)
        for step in range(max_new_tokens):
            tok_B, lp_B = self._pick(logits_B1V[:, -1], temperature, top_p, gen)
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
            logits_B1V = self.model(input_ids=tok_B.masked_fill(done_B, self.pad_id)[:, None],
                                    attention_mask=mask_BT[:, :L + step + 1], position_ids=pos_B1,
                                    use_cache=True, logits_to_keep=1, **cache).logits
        lens, done = len_B.tolist(), done_B.tolist()
        resp = [r[:k] for r, k in zip(resp_BT.tolist(), lens)]
        lps = [r[:k] for r, k in zip(lp_BT.tolist(), lens)]
        texts = self.tokenizer.batch_decode(resp, skip_special_tokens=True)
        return [Generation(response_ids=resp[b], logprobs=lps[b], text=texts[b],
                           finish_reason="stop" if done[b] else "length") for b in range(B)]

"""``agentopd diagnose variance``: how noisy is each gradient estimator of the objective?

On real rollouts of a config's model and env (the training step's problems and seeds, no update:
measured at the current weights), the per-state gradient of the **LM head** ``W`` (logits ``u = W h``,
the student ``pi = softmax(u / tau)``, ``tau`` the sampling temperature; the teacher ``T`` its
next-token distribution given its context, as training scores it) under four estimators, gamma = 0
(no credit through later tokens), with ``c_a = log pi_a - log T_a``:

- ``sampled_token``: ``c_a grad log pi(a|s)`` at the sampled token ``a ~ pi`` (reverse KL);
- ``enumerated``: ``grad KL_alpha(pi || T)`` over the whole vocabulary, ``= E_a[sampled_token]`` at
  ``alpha = 1`` (in logit space ``pi * (c - KL) / tau``); autograd of
  :func:`agentopd.rl.losses.kl_alpha_per_token` at the config's other alphas;
- ``enumerated_topk``: autograd of :func:`agentopd.rl.losses.kl_alpha_topk_per_token` (the student's
  top-K plus a tail bucket);
- ``grpo``: ``-A grad log pi(a|s)``, ``A`` the episode's GRPO advantage.

A state's head gradient is the outer product ``g ⊗ h`` (``g = dloss/du``). It is measured through a
fixed seeded Kronecker projection ``(P g) ⊗ (Q h)`` (:class:`Projection`: Gaussian ``P`` d1 x V and
``Q`` d2 x H scaled by ``1/sqrt(d)``, the identity where d equals V or H, then exact), which keeps
inner products in expectation. Over the states (weights ``w``, summing to 1): the mean ``m``,
``variance = trace(cov) = sum w |f|^2 - |m|^2`` and ``snr = |m|^2 / variance``.

The Rao-Blackwell split (law of total variance): ``Var(sampled) = across_state + within_state``,
``across_state`` the variance over states of ``E_a[sampled | s]``, i.e. of the reverse-KL enumerated
gradient (the enumerated estimator's variance at alpha 1: the same numbers), ``within_state`` the
weighted mean of ``Var_a(sampled | s)``, computed exactly per state by enumerating the vocabulary.
So the reported ``sampled_token`` figures are ``variance = across + within`` with the mean of the
enumerated estimator (their expectations are equal), and ``sampled_token.measured`` the same figures
from the sampled tokens themselves (noisier; equal on an exact enumeration).

On rollouts the states are weighted uniformly over the response tokens (as the token-mean loss weighs
them; the distillation estimators over the tokens of rows with a teacher context) and ``|m|^2`` is
bias-corrected, ``|m|^2 - variance / (N - 1)`` clamped at 0 (``mean_sq``; ``mean_sq_raw`` without),
since the mean of N states carries ``variance / N`` of noise. :func:`statistics` with explicit exact
weights (``bias_correct=False``) gives the exact figures of an enumerated toy.

The head's gradient is measured whether or not the run trains the head (a LoRA run does not): it is
the probe of each estimator's noise, the same per-state logit gradient times the state's features.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

ESTIMATORS = ("sampled_token", "enumerated", "enumerated_topk", "grpo")
DEFAULT_TOPK = 20
"""K of ``enumerated_topk`` when the config's ``algo.distill_topk`` is 0."""
D1, D2 = 256, 32
"""The default projection sizes of the gradient's vocabulary and hidden sides."""
CHUNK_ELEMENTS = 1 << 22
"""At most this many logits per chunk of states (``optim.logits_chunk`` positions, fewer at a large
vocabulary): the statistics hold about a dozen ``[chunk, V]`` float64 tensors at a time."""


# ---------------------------------------------------------------------------------- projection


class Projection:
    """A fixed random Kronecker projection of ``[V, H]`` head gradients ``g ⊗ h``: ``P g`` (``P``
    d1 x V Gaussian / sqrt(d1)) and ``Q h`` (``Q`` d2 x H / sqrt(d2)), seeded; a side whose size is
    its full dimension is the identity (exact)."""

    def __init__(self, V: int, H: int, d1: int = D1, d2: int = D2, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.V, self.H, self.d1, self.d2 = V, H, min(d1, V), min(d2, H)
        self.P_dV = None if self.d1 == V else torch.randn(self.d1, V, generator=gen, dtype=torch.float64) / math.sqrt(self.d1)
        self.Q_dH = None if self.d2 == H else torch.randn(self.d2, H, generator=gen, dtype=torch.float64) / math.sqrt(self.d2)
        self.colnorm_V = torch.ones(V, dtype=torch.float64) if self.P_dV is None else (self.P_dV ** 2).sum(0)

    @property
    def exact(self) -> bool:
        return self.P_dV is None and self.Q_dH is None

    def left(self, g_NV: torch.Tensor) -> torch.Tensor:
        """``P g`` per row, ``[N, d1]``."""
        return g_NV if self.P_dV is None else g_NV @ self.P_dV.T

    def right(self, h_NH: torch.Tensor) -> torch.Tensor:
        """``Q h`` per row, ``[N, d2]``."""
        return h_NH if self.Q_dH is None else h_NH @ self.Q_dH.T

    def columns(self, a_N: torch.Tensor) -> torch.Tensor:
        """``P e_a`` per row, ``[N, d1]``."""
        return torch.nn.functional.one_hot(a_N, self.V).double() if self.P_dV is None else self.P_dV[:, a_N].T

    def cross(self, Pv_Nd: torch.Tensor) -> torch.Tensor:
        """``(P e_a) . (P v)`` for every token ``a``, ``[N, V]``."""
        return Pv_Nd if self.P_dV is None else Pv_Nd @ self.P_dV


# ---------------------------------------------------------------------------------- statistics


@dataclass
class States:
    """A chunk of visited states: the student's final hidden states and raw logits ``u = W h`` (the
    head's, before the temperature), the teacher's raw logits at the same positions, the sampled token,
    its GRPO advantage, and each state's weight in the distillation and in the policy-gradient terms
    (any scale: they are normalised over all chunks)."""

    hidden_NH: torch.Tensor
    logits_NV: torch.Tensor
    teacher_logits_NV: torch.Tensor
    action_N: torch.Tensor
    advantage_N: torch.Tensor
    distill_w_N: torch.Tensor
    pg_w_N: torch.Tensor


@dataclass
class _Moments:
    """Running weighted sums of projected features: ``sum w``, ``sum w f`` (``[d1, d2]``),
    ``sum w |f|^2``, the count of states with ``w > 0`` and ``sum w x`` of a per-state extra ``x``."""

    sw: float = 0.0
    sf: torch.Tensor | float = 0.0
    sf2: float = 0.0
    n: int = 0
    sx: float = 0.0

    def add(self, w_N, Pg_Nd, Qh_Nd, extra_N=None) -> None:
        self.sw += float(w_N.sum())
        self.sf = self.sf + (w_N[:, None] * Pg_Nd).T @ Qh_Nd
        self.sf2 += float((w_N * (Pg_Nd ** 2).sum(-1) * (Qh_Nd ** 2).sum(-1)).sum())
        self.n += int((w_N > 0).sum())
        if extra_N is not None:
            self.sx += float((w_N * extra_N).sum())

    def figures(self, bias_correct: bool) -> dict:
        """``variance`` (trace of the covariance), ``mean_sq`` (bias-corrected where asked),
        ``mean_sq_raw``, ``second_moment``, ``snr`` (None: no variance), ``states``."""
        if self.sw <= 0:
            return {"variance": None, "mean_sq": None, "mean_sq_raw": None, "second_moment": None, "snr": None,
                    "states": 0}
        raw = float((torch.as_tensor(self.sf) / self.sw).pow(2).sum())
        second = self.sf2 / self.sw
        var = max(second - raw, 0.0)
        msq = max(raw - var / (self.n - 1), 0.0) if bias_correct and self.n > 1 else raw
        return {"variance": var, "mean_sq": msq, "mean_sq_raw": raw, "second_moment": second,
                "snr": msq / var if var > 0 else None, "states": self.n}


def _grad_logits(fn, logits_NV, teacher_NV) -> torch.Tensor:
    """``d sum_n fn(logits, teacher)_n / d logits``, ``[N, V]`` (each row's own gradient)."""
    with torch.enable_grad():
        u_NV = logits_NV.detach().clone().requires_grad_(True)
        fn(u_NV[None], teacher_NV[None])[0].sum().backward()
    return u_NV.grad


def _chunk_gradients(s: States, tau: float, alpha: float, topk: int, proj: Projection) -> dict:
    """The projected logit-gradients ``P g`` of each estimator at these states, ``[N, d1]``, and each
    state's exact ``E_a |P g_samp|^2`` (``within`` before subtracting ``|P g_enum|^2``)."""
    from agentopd.rl import losses

    u_NV, ut_NV = s.logits_NV.double(), s.teacher_logits_NV.double()
    logp_NV = losses.tempered_logp(u_NV, tau)
    pi_NV, c_NV = logp_NV.exp(), logp_NV - losses.tempered_logp(ut_NV, tau)
    kl_N = (pi_NV * c_NV).sum(-1)
    Ppi_Nd = proj.left(pi_NV)
    Pa_Nd = proj.columns(s.action_N)
    c_a_N = c_NV.gather(-1, s.action_N[:, None])[:, 0]
    rev_Nd = proj.left(pi_NV * (c_NV - kl_N[:, None])) / tau  # reverse KL, enumerated
    dist_sq_NV = proj.colnorm_V - 2 * proj.cross(Ppi_Nd) + (Ppi_Nd ** 2).sum(-1, keepdim=True)  # |P e_a - P pi|^2
    out = {"sampled_token": c_a_N[:, None] * (Pa_Nd - Ppi_Nd) / tau, "across": rev_Nd,
           "samp_sq": (pi_NV * c_NV ** 2 * dist_sq_NV).sum(-1) / tau ** 2,
           "grpo": -s.advantage_N.double()[:, None] * (Pa_Nd - Ppi_Nd) / tau}
    out["enumerated"] = rev_Nd if alpha == 1.0 else proj.left(_grad_logits(
        lambda a, b: losses.kl_alpha_per_token(a, b, alpha, tau), u_NV, ut_NV))
    out["enumerated_topk"] = proj.left(_grad_logits(
        lambda a, b: losses.kl_alpha_topk_per_token(a, b, alpha, topk, tau), u_NV, ut_NV))
    return out


@dataclass
class _Accumulator:
    """The moments of every estimator and of the across/within split over the chunks seen."""

    est: dict = field(default_factory=lambda: {k: _Moments() for k in (*ESTIMATORS, "across")})

    def add(self, s: States, tau: float, alpha: float, topk: int, proj: Projection) -> None:
        g = _chunk_gradients(s, tau, alpha, topk, proj)
        Qh_Nd = proj.right(s.hidden_NH.double())
        dw_N, pw_N = s.distill_w_N.double(), s.pg_w_N.double()
        h_sq_N = (Qh_Nd ** 2).sum(-1)
        within_N = (g["samp_sq"] - (g["across"] ** 2).sum(-1)) * h_sq_N
        for k in ("sampled_token", "enumerated", "enumerated_topk"):
            self.est[k].add(dw_N, g[k], Qh_Nd)
        self.est["across"].add(dw_N, g["across"], Qh_Nd, within_N)
        self.est["grpo"].add(pw_N, g["grpo"], Qh_Nd)


def statistics(chunks: Iterable[States], temperature: float = 1.0, alpha: float = 1.0, topk: int = DEFAULT_TOPK,
               proj: Projection | None = None, bias_correct: bool = True) -> dict:
    """The figures of the module docstring over the states of ``chunks`` (each :class:`States`):
    ``estimators`` (per estimator ``variance``, ``snr``, ``mean_sq``, ``mean_sq_raw``,
    ``second_moment``, ``states``; ``sampled_token`` also ``measured``, the figures of the sampled
    tokens; at ``alpha`` other than 1 also ``enumerated_reverse_kl``, the sampled-token estimator's
    own enumeration), ``across_state``, ``within_state``, ``sampled_check`` (= across + within),
    ``snr_ratio_enumerated_vs_sampled`` and ``snr_ratio_rao_blackwell`` (the reverse-KL enumerated
    estimator's SNR over the sampled-token one's; the same at alpha 1). ``proj`` None: exact
    (identities; the first chunk's sizes)."""
    acc = _Accumulator()
    for s in chunks:
        if proj is None:
            proj = Projection(s.logits_NV.shape[-1], s.hidden_NH.shape[-1], s.logits_NV.shape[-1], s.hidden_NH.shape[-1])
        acc.add(s, temperature, alpha, topk, proj)
    figs = {k: m.figures(bias_correct) for k, m in acc.est.items()}
    across = figs.pop("across")
    rb = acc.est["across"]
    within = rb.sx / rb.sw if rb.sw > 0 else None
    samp = dict(figs["enumerated"] if alpha == 1.0 else across)
    total = None if within is None else across["variance"] + within
    samp.update(variance=total, second_moment=None if total is None else total + samp["mean_sq_raw"],
                snr=samp["mean_sq"] / total if total else None, measured=figs["sampled_token"])
    figs["sampled_token"] = samp
    ratio = lambda a, b: a / b if a is not None and b else None
    est = {k: figs[k] for k in ESTIMATORS} | ({} if alpha == 1.0 else {"enumerated_reverse_kl": across})
    return {"estimators": est, "across_state": across["variance"], "within_state": within, "sampled_check": total,
            "snr_ratio_enumerated_vs_sampled": ratio(figs["enumerated"]["snr"], samp["snr"]),
            "snr_ratio_rao_blackwell": ratio(across["snr"], samp["snr"])}


# ------------------------------------------------------------------------------------ the run


def _checked(cfg, steps: int):
    """The config the rollouts are prepared with, after every check that needs no model: an agentopd
    env, a local teacher whose full distribution can be read, an objective that reads it (a config
    whose objective reads no teacher but names ``teacher.model`` is prepared as ``algo.loss=opd``)."""
    from agentopd.config import ConfigError
    from agentopd.rl import objectives
    from agentopd.train import check

    if steps < 1:
        raise ConfigError(f"--steps: at least 1, got {steps}")
    if cfg.teacher.base_url:
        raise ConfigError("teacher.base_url: a served teacher gives its top-K only; diagnose variance needs the "
                          "teacher's full distribution (teacher.model or the self-teacher)")
    check(cfg)
    if not cfg.env.id.startswith("agentopd/"):
        raise ConfigError(f"diagnose variance needs one of agentopd's envs, not {cfg.env.id}")
    if objectives.needs_teacher(cfg.algo):
        return cfg
    if not cfg.teacher.model:
        raise ConfigError(f"algo.loss={cfg.algo.loss} with algo.advantage={cfg.algo.advantage} reads no teacher: "
                          "diagnose variance needs a distillation objective (opd, sdpo, ...) or a teacher.model")
    return cfg.model_copy(update={"algo": cfg.algo.model_copy(update={"loss": "opd"})})


def _grpo_BT(cfg, rows, mask_BT: torch.Tensor) -> torch.Tensor:
    """The episodes' GRPO advantages on their rows (``algo.advantage_kwargs`` where the config's
    estimator is grpo), 0 outside ``mask_BT``."""
    from agentopd.rl import advantages

    rewards_B = torch.tensor(rows.rewards, dtype=torch.float32)
    inputs = advantages.AdvantageInputs(torch.where(torch.isfinite(rewards_B), rewards_B, torch.nan),
                                        torch.tensor(rows.groups), mask_BT, episode_B=torch.tensor(rows.episodes))
    kw = cfg.algo.advantage_kwargs if cfg.algo.advantage == "grpo" else {}
    return torch.nan_to_num(advantages.compute("grpo", inputs, **kw)) * mask_BT


def _hidden_rows(parts, batch, idx: list[int]):
    """The student's and (zeros on rows without a teacher prompt) the teacher's final hidden states
    at the response positions of rows ``idx``, ``[B, R, H]`` and ``[B, R, H']``, and the teacher's head."""
    from agentopd.rl.logprobs import response_hidden

    P = [batch.prompt_ids[b] for b in idx]
    R = [batch.response_ids[b] for b in idx]
    h_BRH = response_hidden(parts.model, P, R)
    t_rows = [j for j, b in enumerate(idx) if batch.teacher_prompts[b] is not None]
    if not t_rows:
        return h_BRH, None, None
    ht_bRH, head_VH = parts.teacher.hidden([batch.teacher_prompts[idx[j]] for j in t_rows], [R[j] for j in t_rows])
    ht_BRH = h_BRH.new_zeros((*h_BRH.shape[:2], ht_bRH.shape[-1]), dtype=ht_bRH.dtype)
    ht_BRH[t_rows, :ht_bRH.shape[1]] = ht_bRH.to(h_BRH.device)
    return h_BRH, ht_BRH, head_VH


def _head_logits(h_NH: torch.Tensor, head_VH: torch.Tensor) -> torch.Tensor:
    """``h @ W.T`` in float32 on the head's device (no autocast), brought to the CPU, ``[N, V]``."""
    with torch.no_grad(), torch.autocast(head_VH.device.type, enabled=False):
        return (h_NH.to(head_VH.device, torch.float32) @ head_VH.T).cpu()


def _rows_states(parts, batch, adv_BT, idx: list[int], chunk: int):
    """The :class:`States` of rows ``idx``' masked response positions, ``chunk`` positions at a time
    (the logits formed per chunk on the model's device, the statistics on the CPU: never a
    ``[B, T, V]`` tensor)."""
    from agentopd.rl.learner import pad_BT

    with torch.no_grad(), parts.amp():
        h_BRH, ht_BRH, head_t_VH = _hidden_rows(parts, batch, idx)
    R = h_BRH.shape[1]
    m_BR = batch.mask_BT[idx, :R].bool()
    ids_BR = pad_BT([batch.response_ids[b] for b in idx], dtype=torch.long)[0][:, :R]
    dw_BR = (batch.teacher_mask_B[idx, None] * m_BR).to(torch.float64)
    h_NH = h_BRH[m_BR.to(h_BRH.device)]
    ht_NH = ht_BRH[m_BR.to(ht_BRH.device)] if ht_BRH is not None else None
    cols = (ids_BR[m_BR], adv_BT[idx, :R][m_BR], dw_BR[m_BR])
    head_VH = parts.head_VH.detach().float()  # once per micro-batch (a copy only for a low-precision head)
    head_t_VH = head_t_VH.detach().float() if head_t_VH is not None else None
    for s in range(0, len(cols[0]), chunk):
        a_N, adv_N, dw_N = (x[s:s + chunk] for x in cols)
        ut_NV = (_head_logits(ht_NH[s:s + chunk], head_t_VH) if ht_NH is not None
                 else torch.zeros(len(a_N), head_VH.shape[0]))
        h = h_NH[s:s + chunk]
        yield States(h.float().cpu(), _head_logits(h, head_VH), ut_NV, a_N, adv_N, dw_N, torch.ones_like(dw_N))


def _states(cfg, parts, steps: int, counts: dict):
    """The training steps' rollouts (their problems and seeds, no update), then the states of every
    micro-batch of rows; ``counts`` gets the rollouts and tokens."""
    from tqdm import tqdm

    from agentopd import train

    P, mb = cfg.sampling.prompts_per_step, cfg.optim.micro_batch
    chunk = max(1, min(cfg.optim.logits_chunk or 128, CHUNK_ELEMENTS // parts.head_VH.shape[0]))
    for step in range(steps):
        prep = train._prepare(cfg, parts, step, train._starts(cfg, parts.venvs[0], step * P))
        batch = prep.batch
        adv_BT = _grpo_BT(cfg, prep.rows, batch.mask_BT)
        counts["rollouts"] += len(prep.episodes)
        counts["tokens"] += int(batch.mask_BT.sum())
        counts["distill_tokens"] += int((batch.mask_BT * batch.teacher_mask_B[:, None]).sum())
        rows = [b for b in range(len(batch.response_ids)) if batch.mask_BT[b].sum() > 0]
        for s in tqdm(range(0, len(rows), mb), desc=f"step {step + 1}/{steps}: head gradients",
                      disable=not cfg.run.progress, file=sys.stderr):
            yield from _rows_states(parts, batch, adv_BT, rows[s:s + mb], chunk)


def diagnose_variance(cfg, engine=None, judge=None, steps: int = 1, d1: int = D1, d2: int = D2, seed: int = 0) -> dict:
    """The figures of the module docstring on ``steps`` training steps' rollouts of a
    :class:`agentopd.config.Config` (at its current weights; no update), written to
    ``<run.out>/variance.json``. ``engine`` / ``judge``: as in :func:`agentopd.train.train`; ``d1``,
    ``d2``, ``seed``: the projection (:class:`Projection`)."""
    from agentopd import train
    from agentopd.config import ConfigError
    from agentopd.rl.learner import learner_temperature

    objective = cfg.algo.loss
    cfg = _checked(cfg, steps)
    parts = train._setup(cfg, engine, judge)
    counts = {"rollouts": 0, "tokens": 0, "distill_tokens": 0}
    tau, alpha = learner_temperature(cfg.sampling), cfg.algo.distill_alpha
    topk = cfg.algo.distill_topk or DEFAULT_TOPK
    try:
        if parts.head_VH is None:
            raise ConfigError(f"model.path={cfg.model.path}: its logits are not hidden @ W.T (a head with a bias, "
                              "adapters or logit scaling): diagnose variance measures the LM head's gradient")
        proj = Projection(*parts.head_VH.shape, d1, d2, seed)
        stats = statistics(_states(cfg, parts, steps, counts), tau, alpha, topk, proj, bias_correct=True)
    finally:
        train._close(parts.venvs, parts.heldout)
    teacher = cfg.teacher.model or f"self ({cfg.teacher.mode}; context {'+'.join(cfg.teacher.context) or 'none'})"
    report = {**stats, "model": cfg.model.path, "teacher": teacher, "objective": objective, "alpha": alpha,
              "topk": topk, "temperature": tau, "steps": steps, **counts,
              "projection": {"vocab": proj.V, "hidden": proj.H, "d1": proj.d1, "d2": proj.d2, "seed": seed,
                             "exact": proj.exact},
              "bias_corrected": "mean_sq = |mean|^2 - variance / (states - 1), clamped at 0"}
    notes = []
    if objective != cfg.algo.loss:
        notes.append(f"algo.loss={objective} reads no teacher: the rollouts were prepared as algo.loss=opd")
    if not stats["estimators"]["grpo"]["variance"]:
        notes.append("grpo: every advantage is 0 (each group's rewards are equal, or sampling.group_size=1)")
    if notes:
        report["notes"] = notes
    _write(cfg.run.out, report)
    return report


def table(report: dict) -> str:
    """The report as a markdown table, one row per estimator; then the across/within split."""
    def fmt(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    est, r = report["estimators"], report
    rows = list(est.items()) + [("sampled_token (measured)", est["sampled_token"]["measured"])]
    head = (f"head-gradient variance of {r['model']} against {r['teacher']} ({r['objective']}, alpha {r['alpha']}, "
            f"top-K {r['topk']}, temperature {r['temperature']}): {r['rollouts']} rollouts, "
            f"{r['distill_tokens']} distillation tokens of {r['tokens']}")
    lines = [head, "", "| estimator | variance | snr | mean_sq | states |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {fmt(e['variance'])} | {fmt(e['snr'])} | {fmt(e['mean_sq'])} | {e['states']} |" for k, e in rows]
    share = (r["within_state"] / r["sampled_check"]) if r["sampled_check"] else None
    split = (f"across_state {fmt(r['across_state'])} + within_state {fmt(r['within_state'])} = "
             f"{fmt(r['sampled_check'])} (within: {fmt(share)} of the sampled-token variance)")
    ratio = (f"snr enumerated / sampled_token: {fmt(r['snr_ratio_enumerated_vs_sampled'])} "
             f"(reverse KL both: {fmt(r['snr_ratio_rao_blackwell'])})")
    lines += ["", split, ratio]
    return "\n".join(lines) + "\n"


def _write(out: str, report: dict) -> None:
    """``variance.json``, whole or not at all (agentopd.faults.write_text)."""
    from agentopd import faults

    os.makedirs(out, exist_ok=True)
    faults.write_text(os.path.join(out, "variance.json"), json.dumps(report, indent=2))

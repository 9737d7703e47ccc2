"""How much GPU memory a training config needs, per GPU, before anything is loaded: the arithmetic
behind ``agentopd train --dry-run`` and the recipes' comments (configs/recipes/).

A model's shape (:class:`Shape`) comes from its transformers config, instantiated on the meta
device (exact parameter counts, no memory); :data:`KNOWN` holds the configs of the recipes' models
for a machine that has not downloaded them. :func:`estimate` adds up what the learner keeps, per
GPU (``ranks`` > 1 with FSDP2: the sharded states divided by the ranks):

- student weights: float32 master weights, 4 bytes/parameter (the learner's, whatever the stored dtype)
- gradients: float32, 4 bytes per trainable parameter (all, or the LoRA adapter's)
- AdamW: two float32 moments, 8 bytes per trainable parameter
- self-teacher (ema/frozen/trust_region) and reference (``algo.ref_kl``): a float32 copy of the
  trainable parameters each (a LoRA student's teacher shares its frozen base)
- teacher model: its weights in ``teacher.dtype`` (bf16 on CUDA: 2 bytes/parameter), never trained
- vLLM (colocated): ``engine.kwargs.gpu_memory_utilization`` of the GPU (its bf16 weights, KV cache,
  CUDA graphs) while it samples; asleep (level 2) during the update, when it frees it all.
  Unset, it is the largest share that leaves the learner its gradients, moments and headroom
  (:func:`agentopd.inference.vllm.memory_budget`)
- activations of one micro-batch in the update: per token per decoder layer about ``20 H + 8 I``
  bytes under bf16 autocast (float32 residual stream and norms' inputs, bf16 q/k/v/o and the four
  MLP tensors; H hidden, I the MLP's width); with gradient checkpointing each layer keeps only its
  float32 input (4 H) and one layer is recomputed at a time
- logits: ``micro_batch x logits_chunk x V`` positions at a time, 10 bytes each (bf16 logits,
  float32 log-softmax and its gradient); ``logits_chunk`` 0: the whole response at once
- a distillation loss (sdpo, opd, ...) runs the teacher's forward in the update too, without
  gradients: one of its layers at a time and its logits chunk

The peak is the larger of two phases: sampling and scoring (weights, moments, teachers, vLLM's share,
the scoring headroom) and the update (weights, moments, teachers, gradients, activations).
"""
from __future__ import annotations

import dataclasses

GiB = 1024 ** 3
CUDA_CONTEXT = int(0.5 * GiB)
"""The CUDA context and allocator's own use, per process."""

KNOWN = {  # the recipes' models, from their published config.json (model_type and the sizes that count)
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
                                         "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                                         "vocab_size": 151936, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-Coder-7B-Instruct": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                                       "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                                       "vocab_size": 152064, "tie_word_embeddings": False},
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the memory of a model depends on."""

    params: int
    hidden: int
    intermediate: int
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_per_rank: int
    """LoRA parameters per unit of rank on every linear layer but the head (peft's all-linear)."""

    def trainable(self, lora_rank: int) -> int:
        return lora_rank * self.lora_per_rank if lora_rank else self.params

    def kv_bytes_per_token(self) -> int:
        """vLLM's KV cache per token in bf16: keys and values of every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


def shape_of(config) -> Shape:
    """The :class:`Shape` of a transformers config (instantiated on the meta device: no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    lora = sum(m.in_features + m.out_features for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head)
    heads = config.num_attention_heads
    return Shape(sum(p.numel() for p in model.parameters()), config.hidden_size, config.intermediate_size,
                 config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
                 getattr(config, "head_dim", None) or config.hidden_size // heads, config.vocab_size, lora)


def known_config(name: str):
    """The transformers config of a model in :data:`KNOWN`, or None."""
    if name not in KNOWN:
        return None
    from transformers import AutoConfig

    d = dict(KNOWN[name])
    return AutoConfig.for_model(d.pop("model_type"), **d)


@dataclasses.dataclass
class Estimate:
    """Per-GPU bytes: ``rows`` (name, bytes, how it was counted), each phase's sum and the peak."""

    rows: list
    sampling: int
    update: int
    vllm_share: float | None

    @property
    def peak(self) -> int:
        return max(self.sampling, self.update)


def activation_bytes(s: Shape, tokens: int, checkpointing: bool) -> int:
    """One micro-batch's saved activations in the update (``tokens`` = micro_batch x sequence length)."""
    layer = 20 * s.hidden + 8 * s.intermediate
    return tokens * (4 * s.hidden * s.layers + layer if checkpointing else layer * s.layers)


def estimate(cfg, student: Shape, teacher: Shape | None, seq_len: int, gpu_bytes: int, ranks: int = 1) -> Estimate:
    """The per-GPU memory of training ``cfg`` (a :class:`agentopd.config.Config`) on GPUs of
    ``gpu_bytes``, sequences of ``seq_len`` tokens (prompt + response), ``ranks`` processes."""
    from agentopd.rl import objectives

    shard = ranks if ranks > 1 and cfg.run.distributed == "fsdp" else 1
    P, T = student.params, student.trainable(cfg.model.lora_rank)

    def row(what: str, nbytes: int, count: int, of: str):
        return what, nbytes * count // shard, f"{nbytes} B x {count:,} {of}" + (f" / {shard} ranks" if shard > 1 else "")

    rows = [row("student weights (fp32 master)", 4, P, "params"), row("AdamW moments (2 x fp32)", 8, T, "trainable")]
    t = cfg.teacher
    if objectives.needs_teacher(cfg.algo) and not t.model and not t.base_url and t.mode != "live":
        rows.append(row(f"self-teacher copy ({t.mode}, fp32)", 4, T, "trainable"))
    if teacher is not None:
        b = 4 if t.dtype == "float32" else 2
        rows.append(row(f"teacher model ({'fp32' if b == 4 else 'bf16'})", b, teacher.params, "params"))
    if cfg.algo.ref_kl:
        rows.append(row("reference copy (fp32)", 4, T, "trainable"))
    if shard > 1:
        rows.append(("gathered bf16 copy (sync, scoring)", 2 * P, "2 B x params, one whole copy at a time"))
    resident = sum(r[1] for r in rows) + CUDA_CONTEXT
    rows.append(("CUDA context", CUDA_CONTEXT, "per process"))
    grads = row("gradients (fp32)", 4, T, "trainable")
    m, o = cfg.optim.micro_batch, cfg.optim
    act = ("activations (update, one micro-batch)", activation_bytes(student, m * seq_len, cfg.model.gradient_checkpointing),
           f"{m} x {seq_len} tokens x " + ("(4H x layers + 20H + 8I) B, checkpointed" if cfg.model.gradient_checkpointing
                                           else "(20H + 8I) B x layers"))
    positions = o.logits_chunk or cfg.sampling.max_new_tokens
    logits = ("logits (one chunk)", 10 * m * positions * student.vocab, f"10 B x {m} x {positions} x {student.vocab:,}")
    adam = rows[1][1]  # vLLM's share is fixed before the first step, when the moments are not allocated yet
    share, sampling = _sampling(cfg, student, seq_len, gpu_bytes, resident - adam, 12 * T // shard)
    update = [grads, act, logits]
    if "divergence" in objectives.needs(cfg.algo):  # the teacher's forward beside the student's, no grad
        ts = teacher or student
        update.append(("teacher forward (update, no grad)", m * seq_len * (20 * ts.hidden + 8 * ts.intermediate)
                       + 10 * m * positions * ts.vocab, f"{m} x {seq_len} x (20H + 8I) B, its H and I, one layer, + its logits"))
    rows += sampling + update
    return Estimate(rows, resident + sum(r[1] for r in sampling), resident + sum(r[1] for r in update), share)


def _sampling(cfg, s: Shape, seq_len: int, gpu_bytes: int, before: int, pending: int) -> tuple:
    """``(vLLM's share or None, rows)`` of what sampling and scoring add to the resident bytes:
    vLLM's share (checked or chosen as the engine does, with ``before`` bytes held and ``pending``
    still to come: gradients and moments) and the headroom it leaves for scoring; or, with the
    ``hf`` engine, the KV cache of ``engine.batch_size`` sequences and one micro-batch's scoring."""
    if cfg.engine.name != "vllm":
        kv = cfg.engine.batch_size * seq_len * s.kv_bytes_per_token()
        scoring = cfg.optim.micro_batch * seq_len * (20 * s.hidden + 8 * s.intermediate)
        per = s.kv_bytes_per_token()
        return None, [("generation KV cache (hf engine)", kv, f"{cfg.engine.batch_size} x {seq_len} tokens x {per:,} B"),
                      ("scoring (one micro-batch, no grad)", scoring, f"{cfg.optim.micro_batch} x {seq_len} x (20H + 8I) B")]
    from agentopd.inference.vllm import memory_budget

    given = cfg.engine.kwargs.get("headroom_gb")
    headroom = max(2 * GiB, gpu_bytes // 10) if given is None else int(given * GiB)
    share = memory_budget(gpu_bytes, gpu_bytes - before, pending, headroom, cfg.engine.kwargs.get("gpu_memory_utilization"))
    return share, [("vLLM (asleep in the update)", int(share * gpu_bytes), f"gpu_memory_utilization {share:.2f}"),
                   ("scoring headroom (next to vLLM)", headroom, "max(2 GiB, 10% of the GPU) or engine.kwargs.headroom_gb")]

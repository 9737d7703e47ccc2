"""The models a run trains and distils from: the policy (float32 master weights, LoRA, gradient
checkpointing), its teacher (the student itself, a separate frozen model or a served one), the
device and the forward passes' precision. Shared by training and the teacher diagnostic."""
from __future__ import annotations

import os

import torch

from agentopd.config import ConfigError, ModelConfig, RunConfig, TeacherConfig


def load_model(m: ModelConfig, run: RunConfig, device: torch.device):
    """``(model, tokenizer)`` of ``model.path`` on ``device``: float32 master weights whatever the
    stored dtype (bf16 autocast does the compute: AdamW's and the EMA teacher's small updates would be
    lost below bf16's spacing; the teacher and reference copy these), with gradient checkpointing and a
    LoRA adapter as ``m`` asks (its base saved under ``run.out/base`` for the adapter to name)."""
    from agentopd.inference import load_pretrained, resolve_path

    model, tok = load_pretrained(m.path, seed=run.seed, progress=run.progress, dtype=torch.float32)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if m.lora_rank:
        from peft import LoraConfig, get_peft_model

        from agentopd.rl.checkpoints import lora_base

        base = lora_base(resolve_path(m.path, progress=False), model, tok, os.path.join(run.out, "base"))
        model = get_peft_model(model, LoraConfig(r=m.lora_rank, lora_alpha=2 * m.lora_rank, target_modules="all-linear"))
        model.peft_config["default"].base_model_name_or_path = base  # what the saved adapter names
    return model.to(device), tok


def load_teacher(t: TeacherConfig, model, device: torch.device, seed: int = 0, progress: bool = True):
    """The teacher ``t`` names: the self-teacher (:class:`agentopd.rl.teacher.Teacher` of ``model``, in
    ``teacher.mode``), a separate frozen model (:class:`agentopd.rl.teacher.ModelTeacher`, on
    ``teacher.device`` in ``teacher.dtype``) or a served one (:class:`agentopd.rl.served.ServedTeacher`)."""
    from agentopd.rl.teacher import ModelTeacher, Teacher

    if t.base_url:
        from agentopd.rl.served import ServedTeacher

        return ServedTeacher(t.base_url, t.served_model, topk=t.served_topk, timeout=t.timeout)
    if not t.model:
        return Teacher(model, t.mode, tau=t.tau, mix=t.mix)
    from agentopd.inference import load_pretrained

    where = device if t.device == "auto" else torch.device(t.device)
    dtype = {"auto": torch.bfloat16 if where.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[t.dtype]
    teacher_model, _ = load_pretrained(t.model, seed=seed, progress=progress, dtype=dtype)
    return ModelTeacher(teacher_model.to(where))


def pick_device(device: str) -> torch.device:
    """``run.device``; 'auto': CUDA when available, else the CPU."""
    if device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision(value) -> str:
    """``run.precision`` as 'auto', 'bf16' or 'off' (YAML reads a bare off as false)."""
    got = "off" if value is False else value
    if got not in ("auto", "bf16", "off"):  # True, which the config's type lets through
        raise ConfigError(f"run.precision: {value!r}; choices: auto, bf16, off")
    return got


def autocast(precision: str, device: torch.device):
    """A factory of the forward passes' context: bf16 autocast under 'bf16', and under 'auto' on CUDA."""
    on = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)

"""Checkpoints as ``save_pretrained`` directories, beside the state an exact resume needs.

::

    <run.out>/checkpoints/step-N/   the model as transformers writes it (config, safetensors weights,
                                    generation config, tokenizer, chat template); with LoRA the
                                    adapter alone (peft's format), and ``merged/`` with run.save_merged
        trainer_state/              state.json (step, data position, Python and NumPy RNG, teacher
                                    settings), rng.safetensors (torch RNG), teacher.safetensors (the
                                    tensors the teacher does not share with the student),
                                    optimizer.pt (loaded with weights_only=True), offpolicy.pt
                                    (optim.reuse's cache, run.async_steps's next weights)
    <run.out>/final/                the last step's model without trainer_state/ (hard links)
    <run.out>/base/                 a LoRA run's base model, where it has no directory of its own
                                    (tiny, or a merged adapter)

Under torchrun (agentopd.rl.distributed) every rank gathers the sharded tensors and rank 0 alone
writes them, in the single process's format: a checkpoint resumes on any number of ranks that
divides ``sampling.prompts_per_step``. The RNG state saved is rank 0's.

A directory is written as ``step-N.tmp`` and renamed when complete, so a half-written checkpoint is
never the latest. A write that fails (a full disk) removes its ``.tmp`` directory and raises
:class:`agentopd.faults.WriteFailed` (one line: the path, the cause, the free space and about how
much is needed, the newest readable checkpoint); before each write, less free space than twice the
last checkpoint's size is said in a line. ``.tmp`` directories a killed run left are removed by the
next save or resume. Resume takes the newest one that reads; one that does not is skipped with a
warning that names it and the one used instead.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from contextlib import contextmanager

import numpy as np
import torch

from agentopd import faults, jsonl
from agentopd.rl import distributed

STATE = "trainer_state"
OFFPOLICY = "offpolicy.pt"
FORMAT = 1


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


@contextmanager
def _quiet():
    """transformers' loading/saving progress bars off (they would break the training bar)."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def _replace_dir(path: str, write, need: int = 0, what: str = "write", after: str = "") -> None:
    """``write(tmp)`` a directory, then rename it to ``path`` (replacing an older one). A failed
    write removes ``tmp`` and raises :class:`agentopd.faults.WriteFailed` (``need``, ``what`` and
    ``after`` for its line)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with faults.writing(path, need, what, after, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)), _quiet():
            write(tmp)
    except BaseException:  # (a failed write's tmp is already gone; an interrupted one's goes here)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ the model


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every LoRA delta added to its base weight; the peft model
    is left as it is (unlike ``merge_and_unload``)."""
    from peft.tuners.lora import LoraLayer

    lm = peft_model.get_base_model()
    state = {k.replace(".base_layer", ""): v.detach() for k, v in lm.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        for name, module in lm.named_modules():
            if isinstance(module, LoraLayer) and hasattr(module, "get_delta_weight"):
                for adapter in module.active_adapters:
                    state[f"{name}.weight"] = state[f"{name}.weight"] + module.get_delta_weight(adapter)
    return state


def save_model(model, tokenizer, path: str, merged: bool = False, state_dict: dict | None = None) -> None:
    """Model (a peft model: its adapter alone) + tokenizer + chat template + generation config in
    ``path``; ``merged``: also the adapter merged into its base, in ``path/merged``. ``state_dict``:
    the weights to write instead of the model's own (a sharded model's, gathered)."""
    model.save_pretrained(path, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(path)
    if not _is_peft(model):
        return
    lm = model.get_base_model()
    if lm.generation_config is not None:
        lm.generation_config.save_pretrained(path)
    if merged:
        lm.save_pretrained(os.path.join(path, "merged"), state_dict=merged_state_dict(model))
        tokenizer.save_pretrained(os.path.join(path, "merged"))


def lora_base(path: str, model, tokenizer, out: str) -> str:
    """What a LoRA run's adapter names as its base: ``path`` itself when it is a model directory or
    hub id, the micro model's directory, else (tiny, an adapter merged on load) ``model`` saved
    once under ``out``."""
    if path == "micro":
        from agentopd.testbed.micro import ensure

        return os.path.abspath(ensure(progress=False))
    if path != "tiny" and not (os.path.isdir(path) and is_adapter_dir(path)):
        return os.path.abspath(path) if os.path.isdir(path) else path
    if not os.path.isfile(os.path.join(out, "config.json")) and distributed.is_main():
        _replace_dir(out, lambda tmp: save_model(model, tokenizer, tmp))
    distributed.barrier()
    return os.path.abspath(out)


# ------------------------------------------------------------------------------ saving


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """The Python, NumPy and torch RNG states, as a checkpoint keeps them: ``(json-able, tensors)``."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return {"python": [version, list(keys), gauss],
            "numpy": [name, np_keys.tolist(), int(pos), int(has_gauss), float(cached)]}, tensors


def set_rng_state(state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Back to what :func:`rng_state` returned."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _save_trainer_state(path: str, step: int, opt_state: dict, teacher_state: dict, data_pos: int,
                        extra: dict, offpolicy: dict | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(path)
    rng, rng_tensors = rng_state()
    save_file({k: v.detach().cpu().contiguous() for k, v in (teacher_state.pop("model") or {}).items()},
              os.path.join(path, "teacher.safetensors"))
    save_file(rng_tensors, os.path.join(path, "rng.safetensors"))
    torch.save(opt_state, os.path.join(path, "optimizer.pt"))
    if offpolicy:
        torch.save(offpolicy, os.path.join(path, OFFPOLICY))
    with open(os.path.join(path, "state.json"), "w", encoding="utf-8") as f:  # written last
        json.dump({"format": FORMAT, "step": step, "data_pos": data_pos, "teacher": teacher_state, "rng": rng,
                   "extra": extra}, f)


def _tensor_bytes(*dicts) -> int:
    return sum(v.numel() * v.element_size() for d in dicts for v in (d or {}).values() if torch.is_tensor(v))


def _need(ckpt_dir: str, model, opt_state: dict, teacher_state: dict) -> tuple[int, bool]:
    """About how many bytes the next checkpoint takes: the newest one's size, else (no checkpoint
    yet) its tensors' (the trained parameters, the optimizer state, the teacher's own); and whether
    it was measured."""
    found = checkpoints(ckpt_dir)
    if found:
        return faults.dir_size(found[0]), True
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    moments = [s for s in opt_state["state"].values()]
    return _tensor_bytes(trained, teacher_state["model"], *moments), False


def _remove_stale(ckpt_dir: str) -> None:
    """The ``.tmp`` directories a killed run left behind (they hold space and are never read)."""
    if os.path.isdir(ckpt_dir):
        for f in os.listdir(ckpt_dir):
            if re.fullmatch(r"step-\d+\.tmp", f):
                shutil.rmtree(os.path.join(ckpt_dir, f), ignore_errors=True)


def save(ckpt_dir: str, step: int, model, tokenizer, opt, teacher, data_pos: int, merged: bool = False,
         extra: dict | None = None, offpolicy: dict | None = None) -> str:
    """Write ``ckpt_dir/step-<step>/``; returns its path. ``extra``: more JSON state, given back by
    :func:`resume`; ``offpolicy``: tensors, lists and numbers (the rollout cache, the weights the next
    asynchronous rollouts sample with), given back in ``extra["offpolicy"]``. Distributed: every rank calls it (the sharded tensors are gathered), rank 0
    writes, and a failed write raises :class:`agentopd.faults.WriteFailed` on every rank."""
    weights = distributed.full_tensors(model.state_dict()) if distributed.is_sharded(model) else None
    opt_state = distributed.full_optimizer_state(opt.state_dict())
    teacher_state = teacher.state_dict()
    teacher_state["model"] = teacher_state["model"] and distributed.full_tensors(teacher_state["model"])

    def write(tmp):
        save_model(model, tokenizer, tmp, merged, weights)
        _save_trainer_state(os.path.join(tmp, STATE), step, opt_state, teacher_state, data_pos, extra or {}, offpolicy)

    path = os.path.join(ckpt_dir, f"step-{step}")
    failed = None
    if distributed.is_main():
        os.makedirs(ckpt_dir, exist_ok=True)
        _remove_stale(ckpt_dir)
        need, measured = _need(ckpt_dir, model, opt_state, teacher_state)
        if measured:
            faults.check_space(ckpt_dir, need, "checkpoint")
        newest = (checkpoints(ckpt_dir) or ["none"])[0]
        try:
            _replace_dir(path, write, need, "write checkpoint",
                         f"the newest readable checkpoint is {newest}; free space, then resume with run.resume=true")
        except faults.WriteFailed as e:
            failed = e
    failed = distributed.broadcast(failed)
    distributed.barrier()
    if failed is not None:
        raise failed
    return path


def export_final(step_dir: str, final_dir: str) -> None:
    """``final_dir``: the model files of ``step_dir`` (hard links where the filesystem allows); rank 0."""
    if not distributed.is_main():
        return

    def write(tmp):
        try:
            shutil.copytree(step_dir, tmp, ignore=shutil.ignore_patterns(STATE), copy_function=os.link)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(step_dir, tmp, ignore=shutil.ignore_patterns(STATE))

    _replace_dir(final_dir, write, faults.dir_size(step_dir), "write the final model",
                 f"the model is in {step_dir}")


# ------------------------------------------------------------------------------ resuming


def checkpoints(ckpt_dir: str) -> list[str]:
    """The complete checkpoint directories in ``ckpt_dir``, newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    steps = [int(m[1]) for f in os.listdir(ckpt_dir) if (m := re.fullmatch(r"step-(\d+)", f))]
    return [os.path.join(ckpt_dir, f"step-{s}") for s in sorted(steps, reverse=True)]


def _old_format_error(ckpt_dir: str):
    from agentopd.config import ConfigError

    return ConfigError(
        f"{ckpt_dir} holds only old-format checkpoints (step-N.pt pickles); this version resumes from "
        "save_pretrained directories (step-N/). Finish that run with the agentopd version that started "
        "it, or start a new one: choose another run.out or set run.resume=false. (The weights are "
        "torch.load(path, weights_only=False)['model'], loadable with model.load_state_dict.)")


def _read(path: str, model, device) -> dict:
    """Everything ``path`` holds for a resume, read into memory (raises if any part is unreadable)."""
    from safetensors.torch import load_file

    state_dir = os.path.join(path, STATE)
    with open(os.path.join(state_dir, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    if _is_peft(model):
        weights = load_file(os.path.join(path, "adapter_model.safetensors"))
    else:
        from transformers import AutoModelForCausalLM

        weights = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    state |= {"weights": weights,
              "optimizer": torch.load(os.path.join(state_dir, "optimizer.pt"), map_location=device, weights_only=True),
              "teacher_tensors": load_file(os.path.join(state_dir, "teacher.safetensors")),
              "rng_tensors": load_file(os.path.join(state_dir, "rng.safetensors"))}
    if os.path.isfile(os.path.join(state_dir, OFFPOLICY)):
        state.setdefault("extra", {})["offpolicy"] = torch.load(os.path.join(state_dir, OFFPOLICY), weights_only=True)
    return state


def _load_weights(model, weights: dict[str, torch.Tensor]) -> None:
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, weights)
        if result.unexpected_keys:
            raise ValueError(f"adapter tensors the model does not have: {result.unexpected_keys[:5]}")
    else:
        model.load_state_dict(distributed.like(model.state_dict(), weights))  # sharded: this rank's shards


def resume(ckpt_dir: str, model, opt, teacher, device=None) -> tuple[int, int, dict] | None:
    """Load the newest readable checkpoint of ``ckpt_dir`` into the model, optimizer, teacher and the
    RNGs; returns (step, data position, the ``extra`` state it was saved with), or None when there
    is none."""
    if distributed.is_main():
        _remove_stale(ckpt_dir)
    found = checkpoints(ckpt_dir)
    if not found and os.path.isdir(ckpt_dir) and any(re.fullmatch(r"step-\d+\.pt", f) for f in os.listdir(ckpt_dir)):
        raise _old_format_error(ckpt_dir)
    for i, path in enumerate(found):
        try:
            with _quiet():
                state = _read(path, model, device)
        except Exception as e:  # noqa: BLE001  (a truncated or half-deleted checkpoint: try the one before)
            fallback = found[i + 1] if i + 1 < len(found) else "a fresh start"
            warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:200]}); "
                          f"resuming from {fallback}", stacklevel=2)
            continue
        _apply(state, model, opt, teacher, rng=True)
        return state["step"], state["data_pos"], state.get("extra", {})
    return None


def _apply(state: dict, model, opt, teacher, rng: bool) -> None:
    """A checkpoint's state (as :func:`_read` gives it) into the model, optimizer, teacher and,
    with ``rng``, the RNGs."""
    _load_weights(model, state["weights"])
    opt.load_state_dict(distributed.like_optimizer(opt, state["optimizer"]))
    teacher.load_state_dict({**state["teacher"], "model": distributed.like(teacher.own_parameters(),
                                                                           state["teacher_tensors"])})
    if rng:
        set_rng_state(state["rng"], state["rng_tensors"])


def load(path: str, model, opt, teacher, device=None) -> dict:
    """Load checkpoint ``path`` (a ``step-N`` directory) into the model, optimizer and teacher, the
    RNGs left as they are (a rollback goes on from where it is); returns its state (``step``,
    ``data_pos``, ``extra``)."""
    with _quiet():
        state = _read(path, model, device)
    _apply(state, model, opt, teacher, rng=False)
    return {k: state.get(k) for k in ("step", "data_pos", "extra")}


def cut_rows(path: str, step: int) -> None:
    """Keep the rows of JSONL file ``path`` whose ``step`` is at most ``step`` (the rows after it
    came from work a resume redoes); a line that is not a JSON object (torn by a crash mid-write) is
    dropped with a warning. The file is replaced atomically. Rank 0."""
    if not os.path.isfile(path) or not distributed.is_main():
        return
    rows = jsonl.read(path, skip_unreadable=True)
    jsonl.write(path, [r for r in rows if r.get("step", 0) <= step])

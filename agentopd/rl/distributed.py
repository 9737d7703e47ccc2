"""The learner on several processes: ``torchrun --nproc-per-node N -m agentopd train ...``.

torchrun's environment (``WORLD_SIZE`` > 1) starts the process group (nccl on CUDA, gloo on the
CPU); ``run.distributed`` picks the wrapping: 'fsdp' (FSDP2: ``fully_shard`` per decoder layer and
at a :class:`~agentopd.rl.logprobs.Scorer` root around the model, bf16 parameters and float32
reduction on CUDA; the teacher's and reference's copies sharded the same way) or 'ddp'. Every rank
samples, judges and scores its own share of the prompts (whole groups); the token counts of the
token-mean are summed over the ranks, so the loss and the gradient are the single process's.
Forward passes without grad (generation, scoring, the held-out evaluation on rank 0 alone) run on
gathered parameters (:func:`gathered`), so that ranks may run different numbers of them.
With one process every helper here is a no-op.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from agentopd.config import Config
from agentopd.rl.logprobs import ROOTS, Scorer, causal_lm

MODES = ("fsdp", "ddp")
_GATHERED: set[int] = set()  # FSDP modules inside a gathered() block (nested blocks gather once)
_STARTED: list[bool] = []  # this module started the process group


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs, evaluates and writes checkpoints."""
    return rank() == 0


def setup(cfg: Config) -> None:
    """Join torchrun's process group when it started this process (``WORLD_SIZE`` > 1), check that
    the config splits over the ranks, and turn the progress bar off on every rank but 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() and cfg.run.device in ("auto", "cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        _STARTED.append(True)
    check_ranks(cfg, world())
    if not is_main():
        cfg.run.progress = False


def check_ranks(cfg: Config, W: int) -> None:
    """What ``W`` ranks need of the config: whole groups per rank, and what FSDP cannot wrap."""
    from agentopd.config import ConfigError

    if cfg.run.distributed not in MODES:
        raise ConfigError(f"run.distributed: {cfg.run.distributed!r}; choices: {', '.join(MODES)}")
    if W == 1:
        return
    if cfg.sampling.prompts_per_step % W:
        raise ConfigError(f"sampling.prompts_per_step={cfg.sampling.prompts_per_step} does not split over "
                          f"{W} ranks (whole groups per rank): use a multiple of {W}")
    if cfg.run.distributed == "fsdp" and cfg.model.lora_rank:
        raise ConfigError("model.lora_rank with run.distributed=fsdp: the teacher shares the frozen base "
                          "with the student, which FSDP cannot shard twice; use run.distributed=ddp")
    if cfg.run.distributed == "fsdp" and cfg.teacher.mode in ("live", "trust_region") and _divergence(cfg):
        raise ConfigError(f"teacher.mode={cfg.teacher.mode} with a distillation loss and run.distributed=fsdp: "
                          "the student would be scored inside its own sharded update; use ddp or an ema/frozen teacher")


def _divergence(cfg) -> bool:
    from agentopd.rl import objectives

    return "divergence" in objectives.needs(cfg.algo)


def teardown() -> None:
    """Leave the process group this module started."""
    if _STARTED and dist.is_initialized():
        dist.destroy_process_group()
        _STARTED.clear()


def barrier() -> None:
    if world() > 1:
        dist.barrier()


# ------------------------------------------------------------------------------ wrapping


def wrap(cfg: Config, model, teacher, ref, device: torch.device) -> None:
    """Make the model's forward passes distributed (in place): FSDP2 shards the model and the
    teacher's and reference's copies; DDP wraps the model for the update's forward (the copies are
    not trained: each rank keeps its own, identical on every rank)."""
    if world() == 1:
        return
    if cfg.run.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(Scorer(model), device_ids=[device.index or 0] if device.type == "cuda" else None,
                                      forward_sync_buffers=False)
        model.__dict__[ROOTS] = (ddp, None)  # DDP with grad (it syncs the gradients), the model itself without
        return
    for m in [model] + [t.copy for t in (teacher, ref) if t is not None and t.copy is not None]:
        _shard(m, device)


def _shard(model, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
          else MixedPrecisionPolicy())
    for layer in causal_lm(model).get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    root = Scorer(model)  # embeddings, final norm and head: gathered in its forward, kept until after backward
    fully_shard(root, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    with torch.no_grad():  # FSDP's lazy init from the root (the engine calls the model, not the root)
        root({"input_ids": torch.zeros((1, 1), dtype=torch.long, device=device), "use_cache": False})
    root.reshard()
    model.__dict__[ROOTS] = (root, root)


def _fsdp_modules(models) -> list:
    from torch.distributed.fsdp import FSDPModule

    out, seen = [], set()
    for m in models:
        for sub in (m.modules() if m is not None else ()):
            root = sub.__dict__.get(ROOTS, (None,))[0]
            for f in (root.modules() if isinstance(root, FSDPModule) else ()):
                if isinstance(f, FSDPModule) and id(f) not in seen:
                    seen.add(id(f))
                    out.append(f)
    return out


@contextlib.contextmanager
def gathered(*models):
    """The FSDP-sharded parameters of ``models`` (None: left out) whole on every rank for the block,
    so that its forward passes need no collective: each rank may run any number of them (generation,
    no-grad scoring, rank 0's evaluation). Entering is a collective: every rank enters it."""
    mods = [m for m in _fsdp_modules(models) if id(m) not in _GATHERED]
    roots = {id(m.__dict__[ROOTS][0]) for m in models if m is not None and ROOTS in m.__dict__}
    for m in mods:
        _GATHERED.add(id(m))
        if id(m) not in roots:
            m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            if id(m) not in roots:
                m.set_reshard_after_forward(True, recurse=False)
            _GATHERED.discard(id(m))


class GatheringEngine:
    """An engine whose ``generate`` runs on the model's gathered parameters (FSDP)."""

    def __init__(self, engine, model):
        self.engine, self.model = engine, model

    def generate(self, *args, **kwargs):
        with gathered(self.model):
            return self.engine.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def engine(engine, model):
    """``engine``, generating on gathered parameters where the model is sharded."""
    return GatheringEngine(engine, model) if _fsdp_modules([model]) else engine


@contextlib.contextmanager
def grad_sync(model, sync: bool):
    """Gradient accumulation: the update's backward passes in the block reduce gradients over the
    ranks only with ``sync`` (the last micro-batch)."""
    root = model.__dict__.get(ROOTS, (None,))[0]
    if root is None or sync:
        yield
    elif hasattr(root, "no_sync"):  # DDP
        with root.no_sync():
            yield
    else:
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)


# ------------------------------------------------------------------------------ data and numbers


def rank_share(items: list) -> list:
    """This rank's contiguous share of a step's prompts (whole prompts, so whole groups)."""
    n = len(items) // world()
    return items[rank() * n:(rank() + 1) * n] if world() > 1 else items


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(x_: torch.Tensor) -> torch.Tensor:
    """``x_`` summed over the ranks (float64 on the wire), in its dtype and on its device."""
    if world() == 1:
        return x_
    y_ = x_.detach().to(_comm_device(), torch.float64).clone()
    dist.all_reduce(y_)
    return y_.to(x_.device, x_.dtype)


def sum_dicts(d: dict) -> dict:
    """Numeric dicts summed key by key over the ranks (a key missing on a rank counts 0)."""
    if world() == 1:
        return d
    got = [None] * world()
    dist.all_gather_object(got, d)
    return {k: sum(g.get(k, 0.0) for g in got) for k in dict.fromkeys(k for g in got for k in g)}


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return world() > 1 and any(isinstance(p, DTensor) for p in model.parameters())


def full(x_):
    """A sharded tensor (DTensor) whole on every rank (a collective), on the CPU; other values as they are."""
    from torch.distributed.tensor import DTensor

    return x_.full_tensor().cpu() if isinstance(x_, DTensor) else x_


def full_tensors(d: dict) -> dict:
    """``d`` with every sharded tensor whole (every rank calls it, in the same order)."""
    return {k: full(v) for k, v in d.items()}


def full_optimizer_state(state: dict) -> dict:
    """An optimizer's ``state_dict()`` with its sharded tensors whole: the single process's format."""
    return {**state, "state": {i: full_tensors(s) for i, s in state["state"].items()}}


def like(current: dict, loaded: dict) -> dict:
    """``loaded``'s whole tensors sharded as ``current``'s are (each rank keeps its own shard, no
    communication); other values as they are."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = dict(loaded)
    for k, cur in current.items():
        if isinstance(cur, DTensor) and k in loaded:
            out[k] = distribute_tensor(loaded[k].to(cur.device, cur.dtype), cur.device_mesh, cur.placements,
                                       src_data_rank=None)
    return out


def like_optimizer(opt, state: dict) -> dict:
    """A whole optimizer state (:func:`full_optimizer_state`) sharded as the optimizer's parameters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    per = {i: like({k: params[i] for k, v in s.items() if torch.is_tensor(v) and v.shape == params[i].shape}, s)
           for i, s in state["state"].items()}
    return {**state, "state": per}

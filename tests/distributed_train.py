"""A training run on the tiny model with a scripted engine, for tests/test_distributed.py and
bench/scaling.py: ``python tests/distributed_train.py OUT MODES [override ...]`` (MODES: fsdp, ddp
or both as ``fsdp,ddp``: one run each, in ``OUT/<mode>``, in the same processes), under
``python -m torch.distributed.run --nproc-per-node N`` or on its own (one process). The engine's
samples depend on each prompt's ids alone, so that any split of the prompts over ranks sees the
same batch."""
from __future__ import annotations

import json
import random
import sys
import zlib
from pathlib import Path

from agentopd.inference.base import Engine

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["run.progress=false", "model.path=tiny", "env.id=agentopd/Math-v0", "env.kwargs.problems=arithmetic", "env.kwargs.levels=[1,2]",
             "sampling.prompts_per_step=4", "sampling.group_size=2", "sampling.max_new_tokens=8", "optim.micro_batch=3",
             "optim.lr=0.0005", "algo.advantage_kwargs={}", "algo.ref_kl=0.1", "algo.distill_weight=0.1",
             "algo.distill_topk=0", "eval.problems=2", "eval.samples=1", "run.steps=3",
             "run.checkpoint_every=2", "run.samples_every=1",
             "optim.share_prompts=false"]  # the ranks' plain forwards, to 1e-6 (shared prompts: rounding apart)


class Scripted(Engine):
    """Responses drawn from each prompt's own ids (lengths 0..max_new_tokens, a few correct answers
    never needed: the critique gives the self-teacher its signal), with fixed sampling log-probs."""

    def __init__(self, model, tokenizer, device=None):
        self.tokenizer = tokenizer

    def generate(self, prompt_ids, n=1, max_new_tokens=8, **kw):
        from agentopd.types import Generation

        out = []
        for p in prompt_ids:
            rng = random.Random(zlib.crc32(json.dumps(list(p)).encode()))
            gens = []
            for _ in range(n):
                ids = [rng.randrange(10, len(self.tokenizer) - 1) for _ in range(rng.randint(0, max_new_tokens))]
                gens.append(Generation(ids, [-2.0] * len(ids), self.tokenizer.decode(ids, skip_special_tokens=True),
                                       "length"))
            out.append(gens)
        return out


def run(out: str, *overrides: str) -> list[dict]:
    from agentopd.config import load
    from agentopd.train import train

    import torch

    cfg = load(str(ROOT / "configs" / "micro-sdpo.yaml"), [*OVERRIDES, f"run.out={out}", *overrides])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank of 2 on this host (agentopd.threads): the same float32 sums
    try:
        return train(cfg, engine=Scripted)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process group for all the runs (train() leaves it be)
        dist.init_process_group("gloo")
    for mode in sys.argv[2].split(","):
        run(str(Path(sys.argv[1], mode)), f"run.distributed={mode}", *sys.argv[3:])
    if dist.is_initialized():
        dist.destroy_process_group()

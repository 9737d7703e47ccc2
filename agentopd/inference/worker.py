"""The ``hf`` engine in a process of its own, holding its own copy of the weights (``run.async_steps``):
the learner updates its model while this one samples.

The copy lives in shared memory (``torch.multiprocessing``): the child samples with it, and
:meth:`ProcessEngine.load` writes new weights into it between calls (every call waits for the
child's answer, so the child is idle then). Only the trained parameters are written (a LoRA
run's adapter; the frozen weights never change). The child runs ``threads`` torch threads (the
learner's process keeps the rest of the cores).
"""
from __future__ import annotations

import copy
import threading

import torch

from agentopd.inference.base import Engine, EngineError


def _serve(conn, model, tokenizer, batch_size: int, threads: int, kwargs: dict) -> None:
    """The child: answer ``("generate", args, kw)`` with ``("ok", generations)`` or ``("error", text)``
    until ``("close",)`` or the pipe closes."""
    torch.set_num_threads(threads)
    from agentopd.inference.hf import HFEngine

    engine = HFEngine(model, tokenizer, batch_size=batch_size, **kwargs)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "close":
            return
        try:
            conn.send(("ok", engine.generate(*msg[1], **msg[2])))
        except Exception as e:  # noqa: BLE001  (the parent raises it as an EngineError)
            conn.send(("error", f"{type(e).__name__}: {e}"))


class ProcessEngine(Engine):
    """An :class:`agentopd.inference.hf.HFEngine` in a child process over a copy of ``model``'s weights
    as they are now; :meth:`load` changes them. Calls are serialised (one at a time)."""

    def __init__(self, model, tokenizer, batch_size: int = 32, threads: int = 1, **kwargs):
        ctx = torch.multiprocessing.get_context("spawn")
        self._copy = copy.deepcopy(model).to("cpu").eval()
        for p in self._copy.parameters():
            p.requires_grad_(False)
        self._copy.share_memory()  # the child samples with these very tensors
        self._trained = [n for n, p in model.named_parameters() if p.requires_grad]
        self._params = dict(self._copy.named_parameters())
        self._conn, child = ctx.Pipe()
        self._lock = threading.Lock()
        self._proc = ctx.Process(target=_serve, args=(child, self._copy, tokenizer, batch_size, threads, kwargs),
                                 daemon=True, name="agentopd-engine")
        self._proc.start()
        child.close()

    def trained_state(self, model) -> dict[str, torch.Tensor]:
        """A copy of ``model``'s trained parameters, as :meth:`load` takes them (a snapshot to sample with later)."""
        params = dict(model.named_parameters())
        return {n: params[n].detach().to("cpu", copy=True) for n in self._trained}

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Sample with these trained parameters from the next call on."""
        with self._lock, torch.no_grad():
            for n, w in weights.items():
                self._params[n].copy_(w)

    def generate(self, prompt_ids, **kw):
        with self._lock:
            if not self._proc.is_alive():
                raise EngineError(f"the engine process exited (status {self._proc.exitcode})")
            self._conn.send(("generate", (prompt_ids,), kw))
            try:
                status, got = self._conn.recv()
            except EOFError:
                raise EngineError(f"the engine process exited (status {self._proc.exitcode})") from None
        if status != "ok":
            raise EngineError(f"the engine process failed: {got}")
        return got

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("close",))
            except OSError:
                pass
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
        self._conn.close()

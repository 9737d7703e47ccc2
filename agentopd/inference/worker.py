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


def _serve(conn, threads: int) -> None:
    """The child: first ``("model", model, tokenizer, batch_size, kwargs)``, then answer ``("generate",
    args, kw)`` with ``("ok", generations)`` or ``("error", text)`` until ``("close",)`` or the pipe
    closes. Its imports run while the parent still loads (it is started first)."""
    torch.set_num_threads(threads)
    from agentopd.inference.hf import HFEngine

    engine = None
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "close":
            return
        try:
            if msg[0] == "model":
                engine = HFEngine(msg[1], msg[2], batch_size=msg[3], **msg[4])
                conn.send(("ok", None))
            else:
                conn.send(("ok", engine.generate(*msg[1], **msg[2])))
        except Exception as e:  # noqa: BLE001  (the parent raises it as an EngineError)
            conn.send(("error", f"{type(e).__name__}: {e}"))


class ProcessEngine(Engine):
    """An :class:`agentopd.inference.hf.HFEngine` in a child process (started at once, so that its
    imports overlap the caller's loading) over a copy of a model's weights (:meth:`attach`: as they
    are then); :meth:`load` changes them. Calls are serialised (one at a time)."""

    def __init__(self, threads: int = 1):
        ctx = torch.multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._lock = threading.Lock()
        self._proc = ctx.Process(target=_serve, args=(child, threads), daemon=True, name="agentopd-engine")
        self._proc.start()
        child.close()

    def attach(self, model, tokenizer, batch_size: int = 32, **kwargs) -> ProcessEngine:
        """Sample with a copy of ``model`` (in shared memory: the child samples with these very
        tensors) through an hf engine of these arguments."""
        self._copy = copy.deepcopy(model).to("cpu").eval()
        for p in self._copy.parameters():
            p.requires_grad_(False)
        self._copy.share_memory()
        self._trained = [n for n, p in model.named_parameters() if p.requires_grad]
        self._params = dict(self._copy.named_parameters())
        self._call("model", self._copy, tokenizer, batch_size, kwargs)
        return self

    def trained_state(self, model) -> dict[str, torch.Tensor]:
        """A copy of ``model``'s trained parameters, as :meth:`load` takes them (a snapshot to sample with later)."""
        params = dict(model.named_parameters())
        return {n: params[n].detach().to("cpu", copy=True) for n in self._trained}

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Sample with these trained parameters from the next call on."""
        with self._lock, torch.no_grad():
            for n, w in weights.items():
                self._params[n].copy_(w)

    def _call(self, *msg):
        with self._lock:
            if not self._proc.is_alive():
                raise EngineError(f"the engine process exited (status {self._proc.exitcode})")
            self._conn.send(msg)
            try:
                status, got = self._conn.recv()
            except EOFError:
                raise EngineError(f"the engine process exited (status {self._proc.exitcode})") from None
        if status != "ok":
            raise EngineError(f"the engine process failed: {got}")
        return got

    def generate(self, prompt_ids, **kw):
        return self._call("generate", (prompt_ids,), kw)

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

"""Evaluation: pass@k (passk), a model on a dataset (model), RLEF in-context repair (rlef) and the
held-out pass rate during training (heldout); all sample through :mod:`agentopd.rollout`."""

"""The learner under torchrun on CPU (gloo, 2 ranks) on the tiny model, a scripted engine and a fixed
batch (tests/distributed_train.py): after 3 steps the parameters (and the EMA teacher) equal a
single-process run of the same global batch to 1e-6, with FSDP2 and with DDP; a 2-rank checkpoint
resumes in a 1-rank run; the metrics, samples and checkpoints are written once (rank 0)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_train import run  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "distributed_train.py"


def _torchrun(out, modes, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    got = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(SCRIPT), str(out), modes, *overrides], capture_output=True, text=True, timeout=180, env=env)
    assert got.returncode == 0, got.stderr[-3000:]


def _state(out, step=3):
    d = Path(out, "checkpoints", f"step-{step}")
    return load_file(d / "model.safetensors"), load_file(d / "trainer_state" / "teacher.safetensors")


def _close(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tol, worst


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run(str(out))
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    _torchrun(out, "fsdp,ddp")  # one launch, both runs (the start-up is most of the time)
    return out


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_ranks_train_as_one_process(two_ranks, single, mode):
    tmp_path = two_ranks / mode
    (model, teacher), (model1, teacher1) = _state(tmp_path), _state(single)
    _close(model, model1)
    _close(teacher, teacher1)
    from agentopd.testbed.tiny import build_tiny

    fresh = build_tiny(seed=0)[0].state_dict()
    assert max(float((fresh[k] - model[k]).abs().max()) for k in model) > 5e-4  # it did train
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # once, not once per rank
    one = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows[1:]] == pytest.approx([r["loss"] for r in one[1:]], rel=1e-5)
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == len(
        (single / "samples.jsonl").read_text().splitlines())  # once (rank 0's share of each step)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-2", "step-3"]
    assert (tmp_path / "final" / "model.safetensors").exists()
    if mode == "fsdp":  # a 2-rank checkpoint resumes in one process
        again = two_ranks / "again"
        shutil.copytree(tmp_path, again)
        shutil.rmtree(again / "checkpoints" / "step-3")
        rows = run(str(again), "run.resume=true")
        assert [r["step"] for r in rows] == [3]
        _close(_state(again)[0], model1)

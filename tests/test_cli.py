"""The ``agentopd`` command line (agentopd/cli.py), run as a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from agentopd.envs.data import load_humaneval
from sandbox_probe import bwrap_or_skip

SAMPLES = Path(__file__).resolve().parent / "data" / "sandboxfusion-samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample data not found at {SAMPLES}")


@pytest.fixture(scope="module", autouse=True)
def bwrap_ok():
    bwrap_or_skip(workers=1, warm=False).close()


def cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentopd.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _write_samples(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def he():
    return load_humaneval()


# ------------------------------------------------------------------------------------- exec


def test_exec_hello(tmp_path):
    f = tmp_path / "hello.py"
    f.write_text("print('hello, world')\n")
    r = cli("exec", f, "--backend", "bwrap")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "ok" and out["exit_code"] == 0 and out["stdout"] == "hello, world\n"
    assert out["timed_out"] is False and out["stderr"] == ""


def test_exec_stdin_file(tmp_path):
    f = tmp_path / "rev.py"
    f.write_text("import sys\nfor line in sys.stdin:\n    print(line.strip()[::-1])\n")
    inp = tmp_path / "in.txt"
    inp.write_text("abc\nhello\n")
    r = cli("exec", f, "--stdin", inp)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "ok" and out["stdout"] == "cba\nolleh\n"


def test_exec_runtime_error_is_reported_not_raised(tmp_path):
    f = tmp_path / "boom.py"
    f.write_text("print('before')\nraise KeyError('k')\n")
    r = cli("exec", f)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "runtime_error" and out["exit_code"] == 1 and out["stdout"] == "before\n"
    assert "KeyError: 'k'" in out["stderr"]


def test_exec_timeout(tmp_path):
    f = tmp_path / "busy.py"
    f.write_text("while True:\n    pass\n")
    r = cli("exec", "--timeout", "1", f)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "timeout" and out["timed_out"] is True


def test_exec_bogus_backend(tmp_path):
    f = tmp_path / "hello.py"
    f.write_text("print(1)\n")
    r = cli("exec", "--backend", "bogus", f)
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bogus" in lines[0]
    for name in ("bwrap", "docker", "unshare", "process"):
        assert name in lines[0]


def _no_engines_env(tmp_path) -> dict:
    """A PATH on which neither bwrap, docker, unshare nor setpriv can be found."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    return {**os.environ, "PATH": str(empty)}


def test_exec_missing_backend_names_the_fix(tmp_path):
    f = tmp_path / "hello.py"
    f.write_text("print('hi')\n")
    r = cli("exec", f, "--backend", "bwrap", env=_no_engines_env(tmp_path))
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "apt-get install bubblewrap" in r.stderr
    r = cli("exec", f, "--backend", "docker", env=_no_engines_env(tmp_path))
    assert r.returncode == 2 and "docker" in r.stderr and "apt-get install docker.io" in r.stderr


def test_exec_auto_falls_back_with_a_warning(tmp_path):
    f = tmp_path / "hello.py"
    f.write_text("print('hi')\n")
    r = cli("exec", f, "--backend", "auto", env=_no_engines_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stdout"] == "hi\n"
    assert "fell back to 'process'" in r.stderr and "bubblewrap" in r.stderr


def test_exec_missing_file(tmp_path):
    r = cli("exec", tmp_path / "nope.py")
    assert r.returncode != 0 and "nope.py" in r.stderr and "Traceback" not in r.stderr


# -------------------------------------------------------------------------------- eval passk


def test_eval_passk_humaneval(he, tmp_path):
    rows = [{"task_id": p.id, "completion": p.privileged["solution"][len(p.prompt):]} for p in he[:3]]
    rows += [{"task_id": p.id, "completion": "    return None\n"} for p in he[:3]]
    s = _write_samples(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "report.json"
    r = cli("eval", "passk", "--dataset", "humaneval", "--samples", s, "--k", "1", "--json", out, "--quiet",
            "--backend", "bwrap")
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["pass@1"] == pytest.approx(0.5) and report["problems"] == 3 and report["samples"] == 6
    assert json.loads(r.stdout) == report
    assert "161 problems of the dataset have no samples" in r.stderr
    results = [json.loads(line) for line in Path(str(s) + "_results.jsonl").read_text().splitlines()]
    assert [x["passed"] for x in results] == [True] * 3 + [False] * 3
    assert [x["task_id"] for x in results] == [x["task_id"] for x in rows]


def test_eval_passk_unknown_task_id(he, tmp_path):
    rows = [{"task_id": "HumanEval/0", "completion": ""}, {"task_id": "HumanEval/0", "completion": ""},
            {"task_id": "HumanEval/9999", "completion": ""}]
    s = _write_samples(tmp_path / "samples.jsonl", rows)
    r = cli("eval", "passk", "--samples", s, "--k", "1", "--quiet")
    assert r.returncode != 0
    assert "HumanEval/9999" in r.stderr and "line 3" in r.stderr and "Traceback" not in r.stderr
    assert not Path(str(s) + "_results.jsonl").exists()


def test_eval_passk_malformed_samples_row(tmp_path):
    s = tmp_path / "samples.jsonl"
    s.write_text('{"task_id": "HumanEval/0", "completion": ""}\n{"task_id": "HumanEval/1", "completion": \n')
    r = cli("eval", "passk", "--samples", s, "--k", "1", "--quiet")
    assert r.returncode != 0 and f"{s}:2" in r.stderr and "Traceback" not in r.stderr
    s.write_text('{"task_id": "HumanEval/0"}\n')
    r = cli("eval", "passk", "--samples", s, "--k", "1", "--quiet")
    assert r.returncode != 0 and f"{s}:1" in r.stderr and "completion" in r.stderr


def test_eval_passk_bad_k(tmp_path):
    s = _write_samples(tmp_path / "samples.jsonl", [{"task_id": "HumanEval/0", "completion": ""}])
    r = cli("eval", "passk", "--samples", s, "--k", "1,ten")
    assert r.returncode != 0 and "--k" in r.stderr and "Traceback" not in r.stderr


@needs_samples
def test_eval_passk_mbpp_file(tmp_path):
    src = SAMPLES / "mbpp-20.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    s = _write_samples(tmp_path / "samples.jsonl",
                       [{"task_id": str(r["id"]), "completion": r["canonical_solution"]} for r in rows])
    out = tmp_path / "report.json"
    r = cli("eval", "passk", "--dataset", src, "--samples", s, "--k", "1", "--json", out, "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["pass@1"] == 1.0 and report["problems"] == 20 and report["missing_problems"] == 0
    results = [json.loads(line) for line in Path(str(s) + "_results.jsonl").read_text().splitlines()]
    assert len(results) == 20 and all(x["passed"] for x in results)


# ------------------------------------------------------------------------- no heavy imports


def _fake_heavy_modules(tmp_path: Path) -> dict:
    """An environment where ``import torch`` / ``import transformers`` succeed (stand-in packages),
    so ``'torch' in sys.modules`` tells whether the command imported them even where they are not
    installed."""
    d = tmp_path / "fake_site"
    for name in ("torch", "transformers"):
        (d / name).mkdir(parents=True)
        (d / name / "__init__.py").write_text("")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(d), os.environ.get("PYTHONPATH")])))


def _heavy_imports(code: str, env: dict) -> list[str]:
    snippet = (f"import agentopd.cli, sys\nrc = {code}\n"
               "print('RC', rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120, env=env)
    last = r.stdout.strip().splitlines()[-1].split()
    assert last[0] == "RC", r.stdout + r.stderr
    return last[1:]


def test_commands_do_not_import_torch_or_transformers(he, tmp_path):
    env = _fake_heavy_modules(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import torch, transformers, sys; print(sys.modules['torch'])"],
                           capture_output=True, text=True, env=env)
    assert probe.returncode == 0  # the stand-ins are importable: the check below can fail
    f = tmp_path / "hello.py"
    f.write_text("print('hi')\n")
    assert _heavy_imports(f"agentopd.cli.main(['exec', {str(f)!r}])", env) == ["0", "False", "False"]
    s = _write_samples(tmp_path / "samples.jsonl", [{"task_id": he[0].id, "completion": he[0].privileged["solution"][len(he[0].prompt):]}])
    args = ["eval", "passk", "--samples", str(s), "--k", "1", "--quiet"]
    assert _heavy_imports(f"agentopd.cli.main({args!r})", env) == ["0", "False", "False"]


# -------------------------------------------------------------------- bad inputs: one line, exit 2


def _one_line_exit_2(r, *words):
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


@pytest.mark.parametrize("k", ["-1", "0", "1,0", ""])
def test_eval_passk_k_out_of_range(tmp_path, k):
    s = _write_samples(tmp_path / "samples.jsonl", [{"task_id": "HumanEval/0", "completion": ""}])
    _one_line_exit_2(cli("eval", "passk", "--samples", s, f"--k={k}", "--quiet"), "--k", "positive")


def test_eval_passk_timeout_and_workers_out_of_range(tmp_path):
    s = _write_samples(tmp_path / "samples.jsonl", [{"task_id": "HumanEval/0", "completion": ""}])
    _one_line_exit_2(cli("eval", "passk", "--samples", s, "--timeout", "0", "--quiet"), "--timeout", ">0")
    _one_line_exit_2(cli("eval", "passk", "--samples", s, "--workers", "0", "--quiet"), "--workers", ">=1")


@pytest.mark.parametrize("rows, words", [
    ([{"task_id": "e", "text": "Write f.", "test_list": [], "code": "def f(): pass"}], ["test_list", "empty", ":1"]),
    ([{"id": "a", "prompt": "p", "input_output": {"inputs": [], "outputs": []}}], ["no tests", ":1"]),
    ([{"id": "t", "prompt": "p", "tests": 5}], ["tests must be a list", ":1"]),
    ([{"id": "d", "prompt": "p", "tests": ["assert True"]}, {"id": "d", "prompt": "q", "tests": ["assert 1"]}],
     ["duplicate problem id 'd'"]),
])
def test_eval_passk_bad_datasets(tmp_path, rows, words):
    data = _write_samples(tmp_path / "problems.jsonl", rows)
    s = _write_samples(tmp_path / "samples.jsonl", [{"task_id": rows[0].get("task_id", rows[0].get("id")),
                                                     "completion": "x = 1"}])
    _one_line_exit_2(cli("eval", "passk", "--dataset", data, "--samples", s, "--quiet"), str(data), *words)


def test_eval_passk_unreadable_files(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"task_id": "HumanEval/0", "completion": "caf\xe9"}\n')
    _one_line_exit_2(cli("eval", "passk", "--samples", bad, "--quiet"), str(bad), "UTF-8")
    _one_line_exit_2(cli("eval", "passk", "--samples", tmp_path, "--quiet"), str(tmp_path), "directory")


@pytest.mark.parametrize("override, words", [
    ("sampling.group_size=0", ["sampling.group_size", ">= 1"]), ("run.steps=-3", ["run.steps", ">= 1"]),
    ("sampling.max_new_tokens=0", ["sampling.max_new_tokens", ">= 1"]),
    ("sampling.prompts_per_step=0", ["sampling.prompts_per_step"]), ("optim.micro_batch=0", ["optim.micro_batch"]),
    ("env.id=agentopd/Math-v0s", ["env.id", "did you mean 'agentopd/Math-v0'"]),
    ("env.kwargs.judge={name: nosuchjudge}", ["env.kwargs.judge", "nosuchjudge"]), ("env.kwargs.judge=mth", ["mth"]),
    ("sampling.top_p=1.5", ["sampling.top_p", "<= 1"]), ("optim.lr=0", ["optim.lr", "> 0"]),
    # structured options, checked by name and type against what reads them
    ("env.kwargs.judge=[1]", ["env.kwargs.judge", "a judge name or a mapping"]),
    ("env.kwargs.judge={name: tests, timeout_s: abc}", ["env.kwargs.judge.timeout_s", "valid number", "'abc'"]),
    ("env.kwargs.judge={name: tests, timout_s: 3}", ["env.kwargs.judge", "does not take ['timout_s']",
                                                      "did you mean 'timeout_s'"]),
    ("env.kwargs.n=abc", ["env.kwargs.n", "valid integer"]), ("env.kwargs.levels=3", ["env.kwargs.levels", "tuple"]),
    ("env.kwargs.nn=3", ["env.kwargs", "does not take ['nn']", "did you mean 'n'"]),
    ("algo.advantage_kwargs={std_normalize: maybe}", ["algo.advantage_kwargs.std_normalize", "valid boolean"]),
    ("engine.kwargs.batchsize=3", ["engine.kwargs", "does not take ['batchsize']"]),
    ("run.guard=rolback", ["run.guard", "'rollback'"]), ("run.max_error_rate=2", ["run.max_error_rate", "<= 1"]),
])
def test_train_bad_options_fail_before_the_model_loads(tmp_path, override, words):
    # no model could load from this path: an error about it would mean the options were checked too late
    r = cli("train", "--config", "configs/micro-grpo.yaml", f"run.out={tmp_path}", "model.path=/nonexistent", override)
    _one_line_exit_2(r, *words)

"""The micro testbed: its problem generators, the warm-start data (held-out problems excluded, repairs
with real critiques), the checkpoint loading through ``from_pretrained``, a learning test, and the
shipped micro configs for two steps through the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from agentopd.envs.procedural import (
    AMBIGUOUS,
    function_problems,
    function_solution,
    micro_problems,
    micro_solution,
)
from agentopd.judges import make_judge
from transformers import AutoModelForCausalLM, AutoTokenizer

from agentopd.config import load
from agentopd.inference.base import apply_chat
from agentopd.inference.hf import HFEngine
from agentopd.rl.logprobs import sequence_logprobs
from agentopd.testbed.micro import MicroConfig, heldout_problems, warm_start_examples
from agentopd.train import train
from agentopd.types import Generation
from tests.sandbox_probe import bwrap_or_skip

ROOT = Path(__file__).resolve().parents[1]


def test_generators_are_seeded_and_their_reference_answers_are_right():
    assert [p.prompt for p in micro_problems(30, seed=3)] == [p.prompt for p in micro_problems(30, seed=3)]
    assert [p.prompt for p in micro_problems(30, seed=3)] != [p.prompt for p in micro_problems(30, seed=4)]
    problems = micro_problems(60, seed=1)
    judge = make_judge("math")
    try:
        got = judge.judge_many([(p, micro_solution(p)) for p in problems])
        wrong = judge.judge_many([(p, micro_solution(p, int(p.payload["answer"]) + 1)) for p in problems])
    finally:
        judge.close()
    assert all(j.verdict.status == "ok" for j in got)
    assert all(j.verdict.status == "wrong_answer" for j in wrong)
    p = next(p for p in problems if p.payload["op"] == "+" and p.payload["a"] % 10 + p.payload["b"] % 10 >= 10)
    first, second = micro_solution(p).split(", ")[:2]
    assert first.endswith(str(p.payload["a"] % 10 + p.payload["b"] % 10)) and second.endswith(
        str(p.payload["a"] // 10 % 10 + p.payload["b"] // 10 % 10 + 1)), micro_solution(p)  # the carry is written


def test_function_problems_pass_their_tests_in_the_sandbox_and_wrong_code_fails():
    bwrap_or_skip()
    problems = function_problems(20, seed=2)
    judge = make_judge("tests")
    try:
        ok = judge.judge_many([(p, function_solution(p)) for p in problems])
        bad = judge.judge_many([(p, "```python\ndef f(x):\n    return None\n```") for p in problems])
    finally:
        judge.close()
    assert all(j.verdict.status == "ok" for j in ok)
    assert all(j.verdict.status == "wrong_answer" and "expected" in j.critique for j in bad)


def _with_body(problem, body):
    head = problem.privileged["solution"].split("return ")[0]
    return f"```python\n{head}return {body}\n```"


def _passes(body: str, tests: list[str]) -> bool:
    """Whether ``def f(xs): return body`` passes these asserts (our own generated code, run here)."""
    env: dict = {}
    exec(f"def f(xs):\n    return {body}", env)
    try:
        for t in tests:
            exec(t, env)
    except AssertionError:
        return False
    return True


def _ambiguous(problems):
    """(problem, pair) for the problems whose shown examples fit both readings of a pair."""
    return [(p, pair) for p in problems if "(xs)" in p.prompt for pair in AMBIGUOUS
            if all(_passes(b, p.payload["public_tests"]) for b in pair)]


def test_ambiguous_function_problems_follow_the_convention_only_the_hidden_tests_reveal():
    bwrap_or_skip()
    tied = _ambiguous(function_problems(80, seed=4))
    assert len(tied) >= 8 and all(p.payload["public_tests"] == p.payload["tests"][2:] for p, _ in tied)
    assert all(p.privileged["solution"].endswith(pair[0]) for p, pair in tied)  # the environment's convention
    judge = make_judge("tests")
    try:
        other = judge.judge_many([(p, _with_body(p, pair[1])) for p, pair in tied])
    finally:
        judge.close()
    # the other reading passes every shown example and fails the two hidden tests, which the critique quotes
    assert all(j.verdict.passed == 3 and j.verdict.total == 5 for j in other)
    assert all("Wrong answer on test 1:" in j.critique and "expected" in j.critique for j in other)
    # the warm start's problems take either reading, about equally often
    free = _ambiguous(function_problems(400, seed=4, convention=False))
    firsts = sum(p.privileged["solution"].endswith(pair[0]) for p, pair in free)
    assert 0.3 < firsts / len(free) < 0.7, (firsts, len(free))


def test_warm_start_data_leaves_out_held_out_problems_and_repairs_carry_real_critiques():
    bwrap_or_skip()
    cfg = MicroConfig(n_math=300, n_code=60, heldout=300, repair_fraction=0.5)
    examples = warm_start_examples(cfg)
    held = {p.prompt for kind in ("math", "code") for p in heldout_problems(kind, cfg.heldout, cfg.levels)}
    firsts = [msgs[0]["content"] for msgs, _ in examples]
    assert not any(f in held for f in firsts)
    repairs = [(msgs, target) for msgs, target in examples if len(msgs) > 1 or "\n\nCorrect" in msgs[0]["content"]
               or "feedback" in msgs[0]["content"]]
    assert len(repairs) > 50
    text = json.dumps(repairs)
    assert "is incorrect" in text  # the math judge's critique
    assert "expected" in text and "got" in text  # the test judge's critique from the sandbox
    turns = [msgs for msgs, _ in repairs if len(msgs) == 3]
    assert turns and all(m[1]["role"] == "assistant" and m[2]["role"] == "user" for m in turns)


def test_warm_start_loads_with_from_pretrained(micro_dir):
    model = AutoModelForCausalLM.from_pretrained(micro_dir)
    tok = AutoTokenizer.from_pretrained(micro_dir)
    assert model.config.model_type == "llama" and tok.chat_template
    ids = apply_chat(tok, [{"role": "user", "content": "Compute 12 + 34."}])
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert tok.tokenize("1234") == ["1", "2", "3", "4"]  # digits are single tokens
    summary = json.loads((micro_dir / "micro.json").read_text())
    assert set(summary["heldout_pass1"]) == {"math", "code"} and summary["params"] > 0


def test_the_shipped_micro_model_is_what_micro_loads_and_matches_the_defaults():
    from dataclasses import asdict

    from agentopd.inference import load_pretrained
    from agentopd.testbed.micro import SHIPPED_DIR, ensure

    assert ensure() == SHIPPED_DIR
    summary = json.loads((Path(SHIPPED_DIR) / "micro.json").read_text())
    assert summary["config"] == asdict(MicroConfig())  # `agentopd micro pretrain` with the defaults rebuilds it
    model, tok = load_pretrained("micro")
    assert model.config.num_hidden_layers == MicroConfig().layers
    assert sum(p.numel() for p in model.parameters()) == summary["params"]
    assert tok.tokenize("1234") == ["1", "2", "3", "4"] and tok.chat_template


def test_the_teacher_command_builds_a_teacher_with_the_students_tokenizer(tmp_path):
    """`agentopd micro teacher` at a test budget (2 GRPO steps from the micro model): a
    save_pretrained directory with the base's tokenizer, other weights, and its held-out pass@1."""
    from agentopd.inference import load_pretrained
    from agentopd.rl.teacher import tokenizer_mismatch
    from agentopd.testbed.teacher import TeacherRecipe, build_teacher

    summary = build_teacher(str(tmp_path / "t"), TeacherRecipe(steps=2, lr=0.01, heldout=4), base="micro",
                            progress=False)  # the shipped micro model: it solves some problems, so GRPO moves it
    assert json.loads((tmp_path / "t" / "teacher.json").read_text()) == summary
    assert 0.0 <= summary["heldout_pass1"]["code"] <= 1.0 and summary["recipe"]["steps"] == 2
    teacher, ttok = load_pretrained(str(tmp_path / "t"))
    base, btok = load_pretrained("micro")
    assert tokenizer_mismatch(btok, ttok) is None
    b = base.state_dict()
    assert any(not torch.equal(v, b[k]) for k, v in teacher.state_dict().items())


def test_the_shipped_micro_teacher_is_what_micro_teacher_loads_and_beats_the_student():
    from dataclasses import asdict

    from agentopd.inference import load_pretrained, load_tokenizer
    from agentopd.rl.teacher import tokenizer_mismatch
    from agentopd.testbed.micro import SHIPPED_DIR, TEACHER_DIR
    from agentopd.testbed.teacher import TeacherRecipe

    summary = json.loads((Path(TEACHER_DIR) / "teacher.json").read_text())
    assert summary["recipe"] == asdict(TeacherRecipe()) and summary["base"] == "micro"  # the command's defaults
    student = json.loads((Path(SHIPPED_DIR) / "micro.json").read_text())["heldout_pass1"]["code"]
    assert summary["heldout_pass1"]["code"] > student + 0.1
    model, tok = load_pretrained("micro-teacher")
    assert tokenizer_mismatch(load_tokenizer("micro"), tok) is None and model.config.model_type == "llama"


def test_warm_start_is_deterministic_in_its_seed(tmp_path, micro_dir):
    from agentopd.testbed.micro import pretrain

    pretrain(str(tmp_path), MicroConfig(n_math=240, n_code=48, steps=8, batch=16, heldout=6), progress=False)
    a = AutoModelForCausalLM.from_pretrained(micro_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "tokenizer.json").read_text() == (micro_dir / "tokenizer.json").read_text()


class Scripted(HFEngine):
    """Every group holds the rewarded answer and a wrong one, alternately, with their true sampling
    log-probs under the current model."""

    texts = ("", "")

    def generate(self, prompt_ids, n=1, **kw):
        out = []
        for p in prompt_ids:
            resp = [self.tokenizer.encode(self.texts[i % 2], add_special_tokens=False) + [self.tokenizer.eos_token_id]
                    for i in range(n)]
            with torch.no_grad():
                lps = sequence_logprobs(self.model, [p] * n, resp)[0]
            out.append([Generation(r, lp.tolist(), self.texts[i % 2], "stop") for i, (r, lp) in enumerate(zip(resp, lps))])
        return out


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_rl_steps_raise_the_log_probability_of_the_rewarded_answer(tmp_path, micro_dir, advantage):
    problem = micro_problems(1, levels=(1,), seed=5)[0]
    right, wrong = micro_solution(problem), micro_solution(problem, int(problem.payload["answer"]) + 10)
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"id": "p", "question": problem.prompt, "answer": problem.payload["answer"]}) + "\n")
    Scripted.texts = (right, wrong)
    cfg = load(str(ROOT / "configs" / "micro-grpo.yaml"),
               [f"model.path={micro_dir}", "env.id=agentopd/Math-v0", f"env.kwargs.problems={data}", f"run.out={tmp_path / 'run'}",
                "run.progress=false", "eval.problems=0", "run.steps=3", "sampling.prompts_per_step=1",
                "sampling.group_size=4", "optim.lr=0.001", f"algo.advantage={advantage}", "algo.advantage_kwargs={}"])
    train(cfg, engine=Scripted)

    model = AutoModelForCausalLM.from_pretrained(micro_dir)
    tok = AutoTokenizer.from_pretrained(micro_dir)
    prompt = apply_chat(tok, [{"role": "user", "content": problem.prompt}])
    resp = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in (right, wrong)]

    def logp():
        with torch.no_grad():
            return [float(x.sum()) for x in sequence_logprobs(model, [prompt, prompt], resp)[0]]

    before = logp()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    after = logp()
    # the answers share every token up to the boxed value: the rewarded one must have gained on the
    # wrong one (a flipped sign or a zero advantage would shrink or keep the margin)
    assert after[0] - after[1] > before[0] - before[1] + 1.0, (before, after)


TRAIN_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("micro-*.yaml") if p.name != "micro-rlef.yaml")


def test_every_shipped_micro_training_config_is_run_below():
    assert {"micro-sdpo.yaml", "micro-grpo.yaml", "micro-hybrid.yaml", "micro-sdpo-ref.yaml",
            "micro-sdpo-token.yaml", "micro-mix.yaml", "micro-opd.yaml", "micro-opsd.yaml"} <= set(TRAIN_CONFIGS)


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_shipped_micro_configs_run_two_steps_with_held_out_pass1(tmp_path, micro_dir, name):
    import yaml

    teacher = (yaml.safe_load((ROOT / "configs" / name).read_text()).get("teacher") or {}).get("model")
    r = subprocess.run([sys.executable, "-m", "agentopd.cli", "train", "--config", str(ROOT / "configs" / name),
                        "run.steps=2", f"run.out={tmp_path}", "run.progress=false", f"model.path={micro_dir}",
                        "eval.problems=4", "sampling.prompts_per_step=2",
                        *([f"teacher.model={micro_dir}"] if teacher else [])],  # a teacher with this model's tokenizer
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [0, 1, 2]
    assert "heldout_pass1" in rows[0] and "heldout_pass1" in rows[-1] and "heldout_pass1" not in rows[1]
    assert all(k in rows[1] for k in ("reward_mean", "pass_rate", "judge_errors", "adv_mean", "kl_teacher",
                                      "response_len", "tokens_per_s", "time_generate", "time_execute",
                                      "time_score", "time_update", "rollout_logprob_diff", "rollout_is_mean",
                                      "rollout_is_clipfrac"))
    assert (tmp_path / "checkpoints" / "step-2" / "model.safetensors").exists()
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert "held-out pass@1 (4 problems x 2):" in r.stderr

"""``agentopd/CodeAgent-v0``: a scripted policy that calls ``run_python``, then ``run_tests``, then
answers, through the real env, the real sandbox and the micro model's real tokenizer; malformed tool
calls; every limit; token ids carried across tool turns on a chat template with tool markup."""
from __future__ import annotations

import json
import math
from pathlib import Path

import gymnasium as gym
import pytest
from sandbox_probe import bwrap_or_skip
from scripted import ScriptedEngine

import agentopd.envs  # noqa: F401  (registers agentopd's ids)
from agentopd.envs.agent import TOOLS, AgentVectorEnv
from agentopd.envs.procedural import generated_problems
from agentopd.envs.tools import ToolCall, hermes_parser
from agentopd.inference.base import Engine, apply_chat
from agentopd.rollout import rollout

MICRO = str(Path(__file__).resolve().parents[1] / "agentopd" / "testbed" / "micro_model")

# a Qwen2.5-style template (trimmed) on the micro tokenizer's tokens: the tools in a system turn,
# tool calls as <tool_call> markup, tool results grouped in one user turn as <tool_response> blocks
TOOL_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n# Tools\\n\\nYou may call functions. Their signatures:\\n<tools>' }}"
    "{%- for t in tools %}{{ '\\n' + (t | tojson) }}{%- endfor %}{{ '\\n</tools>\\n\\nFor each call, return a json "
    "object within <tool_call></tool_call> XML tags.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{%- endif %}"
    "{{ '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MICRO)


@pytest.fixture(scope="module")
def problems():
    return generated_problems("functions", 2, (1, 2), 5)


def call(name: str, **args) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"


class ScriptedAgent(ScriptedEngine):
    """Plays ``script(problem_prompt)[k]`` at its k-th assistant turn (counted from the prompt's
    assistant headers)."""

    def __init__(self, tok, script, prompts: list[str]):
        super().__init__(tok)
        self.script, self.problem_prompts = script, prompts

    def answer(self, text: str) -> str:
        prompt = next(p for p in self.problem_prompts if p in text)
        return self.script(prompt)[text.count("<|im_start|>assistant") - 1]


def _code(p) -> str:
    return p.privileged["solution"]


def _arg(solution: str) -> str:
    """An argument of the problem's function ``f``, as ``run_python``'s stdin."""
    return "[3, 1, 2]" if "f(xs)" in solution else "3"


def play(tok, problems, script, **env_kw):
    venv = gym.make_vec("agentopd/CodeAgent-v0", num_envs=len(problems), problems=problems, backend="bwrap",
                        **env_kw)
    assert isinstance(venv, AgentVectorEnv)
    engine = ScriptedAgent(tok, script, [p.prompt for p in problems])
    try:
        return rollout(engine, tok, venv, index=list(range(len(problems))), max_turns=env_kw.get("max_turns", 6))
    finally:
        venv.close()


def test_run_python_then_run_tests_then_answer_through_the_real_env_and_sandbox(tok, problems):
    bwrap_or_skip().close()
    by_prompt = {p.prompt: p for p in problems}

    def script(prompt):
        right = _code(by_prompt[prompt])
        return [call("run_python", code=right + "\nprint(f(eval(input())))", stdin=_arg(right)),
                call("run_tests", code="def f(x):\n    return 0"),
                f"Done.\n```python\n{right}\n```"]

    episodes = play(tok, problems, script)
    for ep, p in zip(episodes, problems):
        assert [m["role"] for m in ep.messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
        py, tests = ep.messages[2]["content"], ep.messages[4]["content"]
        sol = {}
        exec(_code(p), sol)  # noqa: S102  (the problem's own reference solution)
        assert py.startswith("exit code: 0") and f"stdout:\n{sol['f'](eval(_arg(_code(p))))}\n" in py
        n_public = len(p.payload["public_tests"])
        assert tests.startswith((f"0/{n_public} tests passed", f"1/{n_public}"))
        assert "Wrong answer on test 1" in tests or "Wrong answer on test 2" in tests
        assert ep.success and ep.reward() == 1.0 and [t.reward for t in ep.turns] == [0.0, 0.0, 1.0]
        assert ep.stats == {"status": "answered", "turns": 3, "tool_calls": 2, "tool_errors": 0,
                            "calls_run_python": 1, "calls_run_tests": 1}
        # hindsight: the tool turns carry the episode's final judgement (the held-out tests: all of them)
        assert all(t.judgement is ep.turns[-1].judgement for t in ep.turns)
        assert ep.turns[-1].judgement.verdict.total == len(p.payload["tests"]) > n_public
        ids, mask = ep.token_ids_and_mask()
        assert ids == ep.turns[-1].prompt_ids + ep.turns[-1].response_ids
        assert [i for i, m in zip(ids, mask) if m] == [i for t in ep.turns for i in t.response_ids]
        outside = tok.decode([i for i, m in zip(ids, mask) if not m])
        assert py in outside and tests in outside and "run_tests(code)" in outside  # tool output: never in the loss
        assert tok.decode(ids).count("<|im_start|>tool\n") == 2  # the micro template's tool turns


def test_an_unreadable_tool_call_is_a_tool_error_message_not_a_crash(tok, problems):
    bwrap_or_skip().close()
    bad = ['<tool_call>{"name": "run_tests", "arguments": {"code": 1}}</tool_call>',  # not a string
           '<tool_call>{"name": "run_tests" "arguments": {}}</tool_call>'  # not JSON
           + call("delete_everything") + '<tool_call>{"name": "run_python"']  # unknown tool; not closed

    def script(prompt):
        return bad + ["```python\ndef f(x):\n    return x\n```"]

    ep = play(tok, problems[:1], script)[0]
    errors = [m["content"] for m in ep.messages if m["role"] == "tool"]
    assert errors == ["Error: run_tests: argument(s) code must be strings",
                      "Error: the tool call is not valid JSON (Expecting ',' delimiter at character 21)",
                      "Error: unknown tool 'delete_everything'; the tools are run_python, run_tests",
                      "Error: the <tool_call> block is not closed with </tool_call>"]
    assert ep.stats["tool_errors"] == 4 and ep.stats["tool_calls"] == 4 and ep.stats["status"] == "answered"
    assert len(ep.turns) == 3 and not ep.success and ep.reward() == 0.0


@pytest.mark.parametrize("limit, kw, script, turns", [
    ("turn_limit", {"max_turns": 2}, lambda: [call("run_tests", code="x = 1")] * 5, 2),
    ("tool_limit", {"max_tool_calls": 2}, lambda: [call("run_tests", code="x = 1") * 2, call("run_tests", code="y")], 2),
    ("token_limit", {"max_tokens": 700}, lambda: [call("run_python", code="print(1)" + " " * 150)] * 9, None),
])
def test_every_limit_ends_the_episode_with_its_status_and_reward_zero(tok, problems, limit, kw, script, turns):
    bwrap_or_skip().close()
    ep = play(tok, problems[:1], lambda prompt: script(), **kw)[0]
    assert ep.stats["status"] == limit and ep.reward() == 0.0 and not ep.success
    assert ep.messages[-1]["role"] == "assistant"  # the last turn got no reply: the episode ended there
    assert "without a final answer" in ep.turns[-1].judgement.critique
    if turns:
        assert len(ep.turns) == turns
    if limit == "token_limit":
        sizes = [len(t.prompt_ids) + len(t.response_ids) for t in ep.turns]
        assert len(sizes) >= 2 and sizes[-1] >= 700 > sizes[-2]  # ended by the first turn that reached it
    if limit == "tool_limit":  # the call past the limit is not run
        assert ep.stats["tool_calls"] == 2 and sum(m["role"] == "tool" for m in ep.messages) == 2


def test_token_ids_continue_across_tool_turns_on_a_template_with_tool_markup(tok, problems):
    bwrap_or_skip().close()
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(MICRO)
    qwen.chat_template = TOOL_TEMPLATE
    by_prompt = {p.prompt: p for p in problems}

    def script(prompt):
        right = _code(by_prompt[prompt])
        return [call("run_tests", code=right) + call("run_python", code="print(2 + 2)"), f"```python\n{right}\n```"]

    ep = play(qwen, problems[:1], script, tool_hint="")[0]
    assert ep.tools == TOOLS and ep.success
    first = ep.turns[0].prompt_ids
    assert first == apply_chat(qwen, ep.messages[:1], TOOLS) and '"name": "run_python"' in qwen.decode(first)
    last = ep.turns[-1]
    assert last.prompt_ids[:len(first) + len(ep.turns[0].response_ids)] == first + ep.turns[0].response_ids
    whole = qwen.apply_chat_template(ep.messages[:-1], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert qwen.decode(last.prompt_ids) == whole  # the same text as the whole conversation rendered ...
    assert last.prompt_ids != apply_chat(qwen, ep.messages[:-1], TOOLS)  # ... but not re-tokenized
    assert whole.count("<tool_response>") == 2 and whole.count("<|im_start|>user") == 2  # both results: one turn
    assert "All 3 tests passed." in whole and "exit code: 0\nstdout:\n4\n" in whole


def test_the_hermes_parser_reads_calls_in_order_and_says_why_one_cannot_be_read():
    text = ('thinking <tool_call>\n{"name": "run_tests", "arguments": "{\\"code\\": \\"x\\"}"}\n</tool_call> then '
            '<tool_call>{"arguments": {}}</tool_call><tool_call>[1]</tool_call>')
    got = hermes_parser(text)
    assert got[0] == ToolCall("run_tests", {"code": "x"})  # arguments given as a JSON string
    assert got[1:] == ['the tool call needs a "name" (a string)', 'the tool call needs a "name" (a string)']
    assert hermes_parser("no calls here, ```python\nx = '<tool'\n```") == []


def test_the_self_teacher_rescores_each_agent_turn_in_its_conversation_with_the_final_critique(tok, problems):
    bwrap_or_skip().close()
    from agentopd.config import TeacherConfig
    from agentopd.rl.teacher import (
        TeacherTemplate,
        context_rows,
        conversation_tails,
        reference_text,
    )

    def script(prompt):  # a wrong final answer after a passing test run: the episode fails
        return [call("run_tests", code=_code(problems[0])), "```python\ndef f(x):\n    return 0\n```"]

    ep = play(tok, problems[:1], script)[0]
    final = ep.turns[-1].judgement
    assert not ep.success and final.verdict.status == "wrong_answer" and final.verdict.total == 5
    tails = conversation_tails([ep], [0, 0], [0, 1])
    assert tails[0] == [] and tails[1] == ep.turns[1].prompt_ids[len(ep.turns[0].prompt_ids):]
    ref = reference_text(ep.privileged, ep.kind)
    rows = context_rows(tok, [ep.prompt], ep.turns, [t.judgement for t in ep.turns], 1,
                        TeacherConfig(context=["feedback", "reference"]), TeacherTemplate(), [0, 0],
                        [(ep.turns[-1].text, ep.success)], [ref], tails=tails)
    for row, tail in zip(rows, tails):
        text = tok.decode(row.ids)
        assert row.critique_shown and final.critique in text and ref in text  # hindsight, the reference
        assert row.ids[len(row.ids) - len(tail):] == tail  # the student's own ids, unchanged
        assert row.ids[:len(row.ids) - len(tail)][-3:] == ep.turns[0].prompt_ids[-3:]  # (the assistant header)
    assert "All 3 tests passed." in tok.decode(rows[1].ids) and "All 3 tests passed." not in tok.decode(rows[0].ids)


class ToolThenAnswer(ScriptedEngine, Engine):
    """A policy for a training step: ``run_tests`` on ``f(x) = x`` first, then that as the answer."""

    def __init__(self, model, tok, device=None):
        super().__init__(tok)

    def answer(self, text: str) -> str:
        code = "def f(x):\n    return x"
        return call("run_tests", code=code) if text.count("<|im_start|>assistant") == 1 else f"```python\n{code}\n```"


@pytest.mark.parametrize("advantage", ["grpo", "hybrid"])
def test_a_training_step_on_agent_episodes_logs_tool_use(tmp_path, advantage):
    bwrap_or_skip().close()
    from agentopd.config import load
    from agentopd.train import train

    root = Path(__file__).resolve().parents[1]
    cfg = load(str(root / "configs" / "micro-agent.yaml"),
               [f"run.out={tmp_path}", "run.progress=false", "model.path=micro", "run.steps=1", "eval.problems=2",
                "eval.samples=1", "sampling.prompts_per_step=2", "sampling.group_size=2",
                f"algo.advantage={advantage}", "algo.advantage_kwargs={}", "env.kwargs.backend=bwrap"])
    rows = train(cfg, engine=ToolThenAnswer)
    row = rows[-1]
    assert row["tool_calls_mean"] == 1.0 and row["tool_errors"] == 0.0 and row["turns_mean"] == 2.0
    assert row["run_tests_frac"] == 1.0 and row["heldout_tool_calls_mean"] == 1.0
    assert row["teacher_signal_frac"] == (1.0 if advantage == "hybrid" else 0.0)


def test_eval_model_and_rlef_play_the_agent_env_and_report_tool_use(tmp_path, tok):
    bwrap_or_skip().close()
    from agentopd.config import load
    from agentopd.eval.model import eval_model
    from agentopd.eval.rlef import rlef

    def cfg(out):
        return load(None, [f"run.out={tmp_path / out}", "run.progress=false", "env.id=agentopd/CodeAgent-v0",
                           "env.kwargs={problems: functions, n: 3, backend: bwrap}", "env.max_turns=3",
                           "eval.problems=3", "eval.samples=2", "eval.k=[1, 2]"])

    for run, out in ((eval_model, "eval"), (rlef, "rlef")):
        report = run(cfg(out), engine=ToolThenAnswer(None, tok))
        assert report["problems"] == 3 and report["tool_calls_mean"] == 1.0 and report["turns_per_episode"] == 2.0
        assert report["run_tests_frac"] == 1.0 and report["pass_rate_run_tests"] == report["pass@1" if run is eval_model
                                                                                             else "1@3"]
        assert math.isnan(report["pass_rate_no_run_tests"]) and report["tool_errors"] == 0.0
        rows = [json.loads(line) for line in (tmp_path / out / "results.jsonl").read_text().splitlines()]
        assert all(r["tool_calls"] == 1 and r["status"] == "answered" and r["turns"] == 2 for r in rows)
        assert "tool calls mean" in (tmp_path / out / "summary.md").read_text()
    assert all(r["passed_after_turn"][:2] == [False, r["passed"]] for r in rows)  # (rlef's) a tool turn: no answer


def test_the_micro_agent_demonstrations_are_episodes_the_env_would_play():
    bwrap_or_skip().close()
    from agentopd.testbed.agent import AgentRecipe, demonstrations

    examples = demonstrations(AgentRecipe(problems=24))
    calls = [(m, t) for m, t in examples if len(m) == 1 and t.startswith("<tool_call>")]
    finals = [(m, t) for m, t in examples if len(m) == 3]
    assert calls and finals and len(calls) == len(finals)  # each tool call is followed by its final answer
    for msgs, target in calls:
        (c,) = hermes_parser(target)
        assert c.name == "run_tests" and msgs[0]["content"].endswith("final answer.")  # the env's own hint
    critiques = [m[2]["content"] for m, _ in finals]
    assert any(c == "All 3 tests passed." for c in critiques) and any("Wrong answer on test" in c for c in critiques)
    assert all(t.startswith("```python\ndef f(") for m, t in examples if not t.startswith("<tool_call>"))


def test_the_single_env_replies_with_tool_messages_and_a_misspelt_option_is_named_before_any_work(problems):
    bwrap_or_skip().close()
    from agentopd.config import ConfigError, load
    from agentopd.train import check

    env = gym.make("agentopd/CodeAgent-v0", problems=problems[:1], backend="bwrap", max_turns=2)
    try:
        obs, info = env.reset(seed=0)
        assert obs.endswith("final answer.") and info["tools"] == TOOLS and info["privileged"]["solution"]
        reply, reward, term, trunc, info = env.step(call("run_python", code="print(input()[::-1])", stdin="abc"))
        assert reply == [{"role": "tool", "name": "run_python", "content": "exit code: 0\nstdout:\ncba\n\nstderr:\n"}]
        assert (reward, term, trunc, info["feedback_status"]) == (0.0, False, False, "tool")
        critique, reward, term, trunc, info = env.step(f"```python\n{_code(problems[0])}\n```")
        assert (reward, term, trunc, info["episode"]["status"]) == (1.0, True, False, "answered")
        assert critique == "All 5 tests passed." and info["episode"]["calls_run_python"] == 1
    finally:
        env.close()
    with pytest.raises(ConfigError, match="did you mean 'max_tool_calls'"):
        check(load(str(Path(__file__).resolve().parents[1] / "configs" / "micro-agent.yaml"),
                   ["env.kwargs.max_tool_call=3"]), load=False)


def test_run_tests_on_all_runs_the_tests_that_judge_the_final_answer(tok, problems):
    bwrap_or_skip().close()

    def script(prompt):
        return [call("run_tests", code="def f(x):\n    return 0"), "```python\ndef f(x):\n    return 0\n```"]

    public, every = (play(tok, problems[:1], script, run_tests_on=on)[0] for on in ("public", "all"))
    assert public.messages[2]["content"].startswith("0/3 tests passed.")  # the prompt's three examples
    assert every.messages[2]["content"].startswith("0/5 tests passed.") and "assert f(0) ==" in every.messages[2]["content"]

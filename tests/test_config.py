"""The one configuration (agentopd.config): YAML + dotted overrides into typed sections, checked by
pydantic; one-line errors that name the key (the nearest valid key, where a moved key went, the
range or choices allowed); every shipped config loads; ``--help`` lists every option."""
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from agentopd.config import Config, ConfigError, help_text, load, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["micro-sdpo.yaml", "micro-grpo.yaml", "micro-hybrid.yaml"])
def test_shipped_configs_load(name):
    cfg = load(str(CONFIGS / name))
    assert cfg.model.path == "micro" and cfg.env.id == "agentopd/Code-v0" and cfg.env.kwargs["problems"] == "functions"
    assert cfg.algo.advantage == {"sdpo": "sd_token", "grpo": "grpo", "hybrid": "hybrid"}[name[6:-5]]


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    assert isinstance(load(str(path)), Config)


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load(str(CONFIGS / "micro-sdpo.yaml"),
               ["run.steps=2", "optim.lr=3e-4", "env.kwargs.levels=[3, 4]", "algo.advantage_kwargs={clamp: 1.0}",
                "teacher.mode=frozen"])
    assert cfg.run.steps == 2 and cfg.optim.lr == pytest.approx(3e-4) and cfg.env.kwargs["levels"] == [3, 4]
    assert cfg.env.kwargs["problems"] == "functions"  # an override of one argument keeps the others
    assert cfg.algo.advantage_kwargs == {"clamp": 1.0} and cfg.teacher.mode == "frozen"
    assert to_dict(cfg)["run"]["steps"] == 2


def test_int_is_accepted_for_a_float_field():
    assert load(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("override, message", [
    ("run.stesp=3", "unknown config key 'run.stesp'; did you mean 'run.steps'?"),
    ("modle.path=x", "unknown config key 'modle'; did you mean 'model'?"),
    ("optim.lr=fast", "optim.lr: input should be a valid number"),
    ("run.steps=2.5", "run.steps: input should be a valid integer"),
    ("run.steps=0", "run.steps: allowed: >= 1 (got 0)"),
    ("sampling.top_p=1.5", "sampling.top_p: allowed: <= 1"),
    ("teacher.mode=warm", "teacher.mode: input should be 'ema', 'frozen', 'live' or 'trust_region' (got 'warm')"),
    ("teacher.context=[feedbak]", "teacher.context.0: input should be 'feedback', 'demonstration' or 'reference'"),
    ("engine.name=tgi", "engine.name: input should be 'hf', 'vllm' or 'openai'"),
    ("eval.k=[0]", "eval.k.0: allowed: >= 1"),
    ("run.steps", "must look like key.sub=value"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["data.env=math", "data.problems=micro"], "config section 'data' is gone: data.env -> env.id"),
    (["run.eval_problems=10"], "config key 'run.eval_problems' is gone: use eval.problems"),
    (["engine.model=x"], "config key 'engine.model' is gone: use model.path"),
    (["sampling.seed=3"], "config key 'sampling.seed' is gone: use run.seed"),
    (["sampling.n=3"], "config key 'sampling.n' is gone: use eval.samples"),
    (["rlef.turns=3"], "config section 'rlef' is gone: rlef.turns -> env.max_turns"),
    (["teacher.use_critique=false"], "config key 'teacher.use_critique' is gone: use teacher.context"),
    (["algo.entropy=0.1"], "config key 'algo.entropy' is gone (it was never used)"),
])
def test_a_key_that_moved_names_its_new_place(overrides, message):
    with pytest.raises(ConfigError) as e:
        load(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(str(bad))
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(str(top))
    typo = tmp_path / "typo.yaml"
    typo.write_text("sampling:\n  group_sise: 8\n")
    with pytest.raises(ConfigError, match="did you mean 'sampling.group_size'"):
        load(str(typo))


def test_help_text_lists_every_option_with_its_docstring_type_default_and_range():
    text = help_text()
    for name, section in Config.model_fields.items():
        for key, field in section.annotation.model_fields.items():
            assert f"  {name}.{key}  " in text, f"{name}.{key}"
            nested = field.annotation.model_fields if isinstance(field.annotation, type) and issubclass(
                field.annotation, BaseModel) else {}
            for sub in nested:  # a section inside a section (optim.reuse): its options too
                assert f"  {name}.{key}.{sub}  " in text, f"{name}.{key}.{sub}"
    assert "  optim.reuse.min_ess  float = 0.5  [>= 0.0, <= 1.0]" in text
    assert "  run.steps  int = 10  [>= 1]" in text and "Training steps." in text
    assert "  teacher.mode  'ema' | 'frozen' | 'live' | 'trust_region' = 'ema'" in text
    assert "  sampling.top_p  float = 1.0  [> 0.0, <= 1.0]" in text


@pytest.mark.parametrize("command", [["train"], ["eval", "model"], ["rlef"], ["diagnose", "teacher"]])
def test_every_config_command_has_help_with_the_options(command):
    r = subprocess.run([sys.executable, "-m", "agentopd", *command, "--help"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "model.path" in r.stdout and "run.out" in r.stdout and "key.sub=value" in r.stdout
    if command == ["train"]:
        assert "algo.trust_region" in r.stdout and "teacher.context" in r.stdout

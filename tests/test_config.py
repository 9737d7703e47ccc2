"""Config loading: YAML + dotted overrides into typed dataclasses, with errors that name the key."""
from pathlib import Path

import pytest

from agentopd.config import ConfigError, load, to_dict
from agentopd.train import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["micro-sdpo.yaml", "micro-grpo.yaml", "micro-hybrid.yaml"])
def test_shipped_configs_load(name):
    cfg = load(TrainConfig, str(CONFIGS / name))
    assert cfg.model.path == "micro" and cfg.data.env == "code" and cfg.data.problems == "functions"
    assert cfg.algo.advantage == {"sdpo": "sd_token", "grpo": "grpo", "hybrid": "hybrid"}[name[6:-5]]


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load(TrainConfig, str(CONFIGS / "micro-sdpo.yaml"),
               ["run.steps=2", "optim.lr=3e-4", "data.levels=[3, 4]", "algo.advantage_kwargs={clamp: 1.0}",
                "teacher.mode=frozen"])
    assert cfg.run.steps == 2 and cfg.optim.lr == pytest.approx(3e-4) and cfg.data.levels == [3, 4]
    assert cfg.algo.advantage_kwargs == {"clamp": 1.0} and cfg.teacher.mode == "frozen"
    assert to_dict(cfg)["run"]["steps"] == 2


def test_int_is_accepted_for_a_float_field():
    assert load(TrainConfig, None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("override, message", [
    ("run.stesp=3", "unknown config key 'run.stesp'; did you mean 'run.steps'?"),
    ("modle.path=x", "unknown config key 'modle'; did you mean 'model'?"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("run.steps=2.5", "run.steps: expected int, got 2.5"),
    ("data.levels=3", "data.levels: expected a list"),
    ("run.steps", "must look like key.sub=value"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load(TrainConfig, None, [override])
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load(TrainConfig, str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(TrainConfig, str(bad))
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(TrainConfig, str(top))
    typo = tmp_path / "typo.yaml"
    typo.write_text("sampling:\n  group_sise: 8\n")
    with pytest.raises(ConfigError, match="did you mean 'sampling.group_size'"):
        load(TrainConfig, str(typo))

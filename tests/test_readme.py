"""The README's commands and code hold: its quickstart runs (the training call at a test budget),
every config it names loads, and every agentopd command in it parses."""
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_is_short_and_links_nothing_outside_the_repository():
    assert len(README.splitlines()) <= 250
    assert "../" not in README and "DESIGN.md" not in README


def test_the_quickstart_runs(tmp_path, monkeypatch):
    code = README.split("```python\n")[1].split("\n```\n")[0]
    code = code.replace('"run.steps=5"', '"run.steps=1", "model.path=tiny", "eval.problems=0", "run.progress=false"')
    code = code.replace("runs/quick", str(tmp_path / "quick"))
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(code, "README quickstart", "exec"), scope)
    assert scope["judgement"].verdict.score == 1.0 and scope["reward"] == 0.0
    assert len(scope["metrics"]) == 1 and (tmp_path / "quick" / "metrics.jsonl").exists()


@pytest.mark.parametrize("name", sorted(set(re.findall(r"configs/[\w.-]+\.yaml", README))))
def test_every_config_the_readme_names_loads(name):
    from agentopd.config import load

    assert load(str(ROOT / name))


COMMANDS = sorted({m.strip() for m in re.findall(r"`(agentopd (?:train|rlef|eval model|diagnose teacher) [^`]+)`", README)})


@pytest.mark.parametrize("command", COMMANDS)
def test_every_config_command_in_the_readme_parses_and_its_config_loads(command):
    from agentopd.cli import build_parser
    from agentopd.config import load

    args = build_parser().parse_args(shlex.split(command)[1:])
    load(str(ROOT / args.config), args.overrides)

"""Typed configs: nested dataclasses filled from YAML and ``key.sub=value`` overrides.

An unknown or mistyped key is an error that names the key and the nearest valid one; a value of
the wrong type names the key and the expected type; a number out of its range names the key and
the range (a config class's ``RANGES``: dotted key -> ``">=1"``, ``">0"``, ``"[0,1]"``, ``"(0,1]"``
or ``"any"``; any other number must be ``>=0``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


RENAMED = {
    "teacher.use_critique": "teacher.context (a list of feedback, demonstration, reference; e.g. [feedback])",
    "teacher.use_demonstration": "teacher.context (a list of feedback, demonstration, reference; e.g. [demonstration])",
}
"""Keys that are gone, and what replaced them: an error naming the new key, not a guess."""


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _nearest(key: str, valid, where: str = "") -> str:
    prefix = f"{where}." if where else ""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value, tp, where: str):
    """Check/convert ``value`` to the annotated type ``tp`` (simple types, Optional, lists, dicts)."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _in_range(value: float, spec: str) -> bool:
    if spec == "any":
        return not math.isnan(value)
    if spec.startswith(">="):
        return value >= float(spec[2:])
    if spec.startswith(">"):
        return value > float(spec[1:])
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return (lo <= value if spec[0] == "[" else lo < value) and (value <= hi if spec[-1] == "]" else value < hi)


def check_ranges(cfg, ranges: dict[str, str], where: str = "") -> None:
    """Every int/float option of ``cfg`` (nested dataclasses) in its range; ConfigError naming the
    key and the allowed range otherwise."""
    for f in dataclasses.fields(cfg):
        path = f"{where}.{f.name}" if where else f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, ranges, path)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            spec = ranges.get(path, ">=0")
            if not _in_range(value, spec):
                raise ConfigError(f"{path}: {value!r} is out of range; allowed: {spec}")


def build(cls, data: dict, where: str = ""):
    """An instance of dataclass ``cls`` from a (nested) dict, checked key by key."""
    fields = _fields(cls)
    hints = typing.get_type_hints(cls)
    kw = {}
    for key, value in (data or {}).items():
        path = f"{where}.{key}" if where else key
        if key not in fields and path in RENAMED:
            raise ConfigError(f"config key '{path}' is gone: use {RENAMED[path]}")
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'{_nearest(key, fields, where)}")
        kw[key] = _coerce(value, hints[key], path)
    return cls(**kw)


def _set(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    d[parts[-1]] = value


def load(cls, path: str | None = None, overrides: list[str] = ()):
    """Read a YAML file (optional), apply ``a.b=value`` overrides (values parsed as YAML), build."""
    data: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, _, raw = item.partition("=")
        _set(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    cfg = build(cls, data)
    check_ranges(cfg, getattr(cls, "RANGES", {}))
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------- sections shared by commands


@dataclass
class SamplingConfig:
    group_size: int = 4
    """Samples per prompt (G)."""
    prompts_per_step: int = 4
    """Prompts per training step."""
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    generate_chunk: int = 0
    """Prompts per engine call; each chunk's samples are judged on a worker thread while the next
    chunk generates. 0: all prompts in one call."""

"""Tool calls in a model's turn: the tools' JSON schemas (the chat template's ``tools`` argument) and
the parsers that read calls out of a turn's text.

The default parser reads Hermes/Qwen-style markup, ``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>``, one block per call. A parser is any callable ``text -> list[ToolCall | str]``: a
``str`` item is a call that could not be read (the message says why); it becomes a tool error
message to the model, never an exception. Name one with ``parser="hermes"`` or an import path
``package.module:function``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", flags=re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict


def function_schema(name: str, description: str, params: dict[str, str], required: list[str]) -> dict:
    """The OpenAI/Hermes function schema of a tool whose parameters are all strings
    (``params``: name -> description)."""
    props = {k: {"type": "string", "description": v} for k, v in params.items()}
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": props,
                                                            "required": required}}}


def hermes_parser(text: str) -> list[ToolCall | str]:
    """The calls in ``text``'s ``<tool_call>`` blocks, in order: a ToolCall, or the reason a block
    cannot be read (not closed, not JSON, no ``name``, ``arguments`` not an object)."""
    out: list[ToolCall | str] = []
    for m in _BLOCK.finditer(text):
        body, closed = m.group(1).strip(), m.group(2)
        if not closed:
            out.append("the <tool_call> block is not closed with </tool_call>")
            continue
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            out.append(f"the tool call is not valid JSON ({e.msg} at character {e.pos})")
            continue
        args = obj.get("arguments", {}) if isinstance(obj, dict) else None
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            out.append('the tool call needs a "name" (a string)')
        elif not isinstance(args, dict):
            out.append('the tool call\'s "arguments" must be a JSON object')
        else:
            out.append(ToolCall(obj["name"], args))
    return out


PARSERS = {"hermes": hermes_parser}


def make_parser(spec):
    """A parser from a name in :data:`PARSERS`, an import path ``module:function``, or a callable."""
    if callable(spec):
        return spec
    if spec in PARSERS:
        return PARSERS[spec]
    if isinstance(spec, str) and ":" in spec:
        import importlib

        module, name = spec.split(":", 1)
        return getattr(importlib.import_module(module), name)
    raise ValueError(f"unknown tool-call parser {spec!r}: one of {sorted(PARSERS)}, or module:function")


def check_call(call: ToolCall, schemas: list[dict]) -> str | None:
    """Why ``call`` does not fit the tool schemas (an unknown tool, a missing or non-string
    argument, an unknown argument), or None."""
    by_name = {s["function"]["name"]: s["function"]["parameters"] for s in schemas}
    if call.name not in by_name:
        return f"unknown tool {call.name!r}; the tools are {', '.join(sorted(by_name))}"
    params = by_name[call.name]
    missing = [k for k in params.get("required", []) if k not in call.arguments]
    if missing:
        return f"{call.name} needs the argument(s) {', '.join(missing)}"
    extra = [k for k in call.arguments if k not in params["properties"]]
    if extra:
        return f"{call.name} takes no argument(s) {', '.join(extra)}"
    bad = [k for k, v in call.arguments.items() if not isinstance(v, str)]
    if bad:
        return f"{call.name}: argument(s) {', '.join(bad)} must be strings"
    return None

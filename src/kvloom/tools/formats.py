"""Tool-call syntaxes per model family: which one a checkpoint speaks, the structural tag that
constrains it (``stream_parser`` reads the calls back out).

- ``hermes`` (Qwen2.5, Qwen3, Hermes): ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``,
  constrained with xgrammar's ``qwen_3`` structural tag (reasoning off).
- ``llama`` (Llama 3.1 / 3.2 JSON tool calling): ``{"name": "f", "parameters": {...}}``,
  constrained with xgrammar's ``llama`` structural tag.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from kvloom.tools.spec import NamedToolChoice, ToolChoice, ToolSpec

ToolCallFormat = Literal["hermes", "llama"]

_XGRAMMAR_MODEL: dict[ToolCallFormat, str] = {"hermes": "qwen_3", "llama": "llama"}


def detect_format(
    architecture: str, chat_template: str | None, explicit: ToolCallFormat | None = None,
) -> ToolCallFormat | None:
    """The checkpoint's tool-call syntax: ``explicit`` (the ``tool_call_format`` setting) if
    given, else what its chat template writes, else its ``config.json`` architecture (Qwen:
    hermes, Llama: llama); None when nothing says (requests with tools are then refused,
    naming the setting)."""
    if explicit is not None:  # EngineConfig has checked the value
        return explicit
    template = chat_template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "ipython" in template and '"parameters"' in template:
        return "llama"
    if architecture.startswith("Qwen"):
        return "hermes"
    if architecture.startswith("Llama"):
        return "llama"
    return None


def structural_tag(
    fmt: ToolCallFormat, tools: Sequence[ToolSpec], choice: ToolChoice, parallel_tool_calls: bool,
) -> str:
    """The xgrammar structural tag (as JSON) that makes every call in ``fmt`` name an allowed
    tool and carry compact arguments valid against its schema.

    ``required`` / a named tool: the output is one call (or, with ``parallel_tool_calls``,
    calls separated by newlines) and nothing else. ``auto``: free text until the model opens a
    call (the family's trigger), then the call is constrained. The per-tool tags come from
    xgrammar's builtin template for the family; only how they are combined is ours.
    """
    import xgrammar

    allowed = [t for t in tools if not isinstance(choice, NamedToolChoice) or t.name == choice.name]
    builtin = xgrammar.get_builtin_structural_tag(
        _XGRAMMAR_MODEL[fmt], tools=[t.to_openai() for t in allowed], tool_choice="auto",
        reasoning=False, parallel_tool_calls=parallel_tool_calls, max_whitespace_cnt=1,
    )
    triggered = _find_triggered_tags(json.loads(builtin.model_dump_json()))
    if choice == "auto":
        fmt_node: dict[str, Any] = dict(triggered, stop_after_first=not parallel_tool_calls)
    else:
        fmt_node = {"type": "tags_with_separator", "tags": triggered["tags"], "separator": "\n",
                    "at_least_one": True, "stop_after_first": not parallel_tool_calls}
    return json.dumps({"type": "structural_tag", "format": fmt_node})


def _find_triggered_tags(node: Any) -> dict[str, Any]:
    """The ``triggered_tags`` node of a builtin structural tag (depth-first)."""
    if isinstance(node, dict):
        if node.get("type") == "triggered_tags":
            return node
        children: Any = list(node.values())
    elif isinstance(node, list):
        children = node
    else:
        children = []
    for child in children:
        try:
            return _find_triggered_tags(child)
        except LookupError:
            continue
    raise LookupError("no triggered_tags in the builtin structural tag")

"""LlamaIndex chat messages, tools and tool calls <-> kvloom's OpenAI-shaped ones.

Invariants:

- an assistant message's calls live in ``additional_kwargs["tool_calls"]`` as OpenAI dicts
  (``{"id", "type": "function", "function": {"name", "arguments": <JSON text>}}``), as
  LlamaIndex's OpenAI LLM keeps them; on the way in, OpenAI client objects and
  ``ToolCallBlock``s are read too, so histories written by other LLMs round trip;
- a tool result (``MessageRole.TOOL``) goes back as ``{"role": "tool", "content",
  "tool_call_id"}``, which the checkpoint's chat template renders;
- the same LlamaIndex messages always convert to the same dicts (prefix handles compare them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    CacheControl,
    CachePoint,
    ChatMessage,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.llms.utils import parse_partial_json

from kvloom.outputs import IncompleteToolCallError, ToolCall

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

ROLE_TO_OPENAI: dict[MessageRole, str] = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}

_NOT_CONTENT = (ThinkingBlock, CachePoint, CacheControl)
"""Blocks that are hints to other providers, not text the model reads."""


def to_openai_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages -> the OpenAI-shaped dicts kvloom's ``messages=`` takes.

    Text blocks join with newlines (as ``ChatMessage.content`` does); a block the model cannot
    read (an image, audio, a document) raises ``ValueError`` naming ``messages[i].blocks[j]``.
    """
    converted = []
    for i, message in enumerate(messages):
        role = ROLE_TO_OPENAI.get(message.role)
        if role is None:
            raise ValueError(f"messages[{i}].role: {message.role!r} has no OpenAI equivalent")
        texts: list[str] = []
        block_calls: list[dict[str, Any]] = []
        for j, block in enumerate(message.blocks):
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolCallBlock):
                block_calls.append(_block_call(block))
            elif not isinstance(block, _NOT_CONTENT):
                raise ValueError(f"messages[{i}].blocks[{j}]: {type(block).__name__} is not supported "
                                 "(kvloom serves text-only models)")
        entry: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
        kw_calls = message.additional_kwargs.get("tool_calls")
        calls = ([openai_tool_call(c, f"messages[{i}].additional_kwargs['tool_calls'][{k}]")
                  for k, c in enumerate(kw_calls)] if kw_calls else block_calls)
        if calls:
            entry["tool_calls"] = calls
        if role == "tool":
            call_id = message.additional_kwargs.get("tool_call_id")
            if call_id is not None:
                entry["tool_call_id"] = str(call_id)
            name = message.additional_kwargs.get("name")
            if name is not None:
                entry["name"] = str(name)
        converted.append(entry)
    return converted


def openai_tool_call(call: Any, where: str = "tool_call") -> dict[str, Any]:
    """A tool call in any shape LlamaIndex holds (an OpenAI dict, an OpenAI client object) ->
    an OpenAI dict whose ``arguments`` is JSON text."""
    data = call.model_dump() if hasattr(call, "model_dump") else call
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected an OpenAI tool call dict, got {type(call).__name__}")
    function = data.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(f"{where}.function.name: missing (expected {{'function': {{'name', 'arguments'}}}})")
    arguments = function.get("arguments")
    if arguments is None:
        arguments = "{}"
    elif not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    return {"id": str(data.get("id") or ""), "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}


def _block_call(block: ToolCallBlock) -> dict[str, Any]:
    kwargs = block.tool_kwargs
    arguments = kwargs if isinstance(kwargs, str) else json.dumps(kwargs)
    return {"id": block.tool_call_id or "", "type": "function",
            "function": {"name": block.tool_name, "arguments": arguments}}


def to_openai_tools(tools: Sequence[BaseTool]) -> list[dict[str, Any]]:
    """LlamaIndex tools -> OpenAI tool dicts (OpenAI's 1,024-character description limit does
    not apply to a local model)."""
    return [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]


def resolve_tool_choice(tool_choice: str | dict[str, Any] | None, tool_required: bool) -> str | dict[str, Any]:
    """LlamaIndex's ``tool_choice`` / ``tool_required`` -> kvloom's ``tool_choice``: ``None``
    is ``"required"`` when a tool is required, else ``"auto"``; a bare tool name selects it."""
    if tool_choice is None:
        return "required" if tool_required else "auto"
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
        return {"type": "function", "function": {"name": tool_choice}}
    return tool_choice


def tool_selections(message: ChatMessage, error_on_no_tool_call: bool) -> list[ToolSelection]:
    """The calls of an assistant message as ``ToolSelection``s. Arguments of a call still
    streaming are parsed as partial JSON (``{}`` when nothing parses yet). A call marked
    ``"incomplete"`` (cut by ``max_tokens``) raises ``IncompleteToolCallError``: its partial
    arguments are never handed to a tool."""
    calls = message.additional_kwargs.get("tool_calls") or []
    if not calls and error_on_no_tool_call:
        raise ValueError("Expected at least one tool call, but got 0 tool calls.")
    selections = []
    for k, call in enumerate(calls):
        data = openai_tool_call(call, f"additional_kwargs['tool_calls'][{k}]")
        if isinstance(call, Mapping) and call.get("incomplete"):
            function = data["function"]
            raise IncompleteToolCallError(ToolCall(data["id"], function["name"], function["arguments"], incomplete=True))
        try:
            arguments = parse_partial_json(data["function"]["arguments"])
        except (ValueError, TypeError):
            arguments = {}
        selections.append(ToolSelection(tool_id=data["id"], tool_name=data["function"]["name"],
                                        tool_kwargs=arguments))
    return selections

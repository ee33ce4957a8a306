"""LangChain messages <-> kvloom's OpenAI-shaped chat messages, completions and stream chunks.

Outbound, every message becomes the dict the chat template renders: an ``AIMessage``'s
``tool_calls`` become OpenAI ``tool_calls`` entries (arguments as JSON text) and a
``ToolMessage`` a ``{"role": "tool", "tool_call_id": ...}`` turn, so an agent's history goes
back to the model as its template expects. The engine reads text only: image, audio and file
blocks are refused with an error naming the block.

Inbound, a ``Completion`` becomes an ``AIMessage`` and each ``StreamChunk`` an
``AIMessageChunk`` whose ``tool_call_chunks`` add up to the same calls; only the last chunk
carries usage and response metadata and ``chunk_position="last"``. A call cut by ``max_tokens``
(``ToolCall.incomplete``) lands in ``invalid_tool_calls`` with an error saying so, and the ids
of such calls are listed in ``response_metadata["incomplete_tool_calls"]``, invoked or streamed
(a streamed one still adds up to a partial call in ``tool_calls``: LangChain parses partial JSON).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.messages.tool import ToolCallChunk
from langchain_core.output_parsers.openai_tools import make_invalid_tool_call, parse_tool_call
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk

from kvloom.outputs import Completion, IncompleteToolCallError, StreamChunk, Usage

_TEXT_BLOCKS = frozenset({"text", "text-plain"})
_SKIPPED_BLOCKS = frozenset({"tool_use", "tool_call", "reasoning", "thinking"})
"""Blocks an assistant message may carry besides text: its calls travel in ``tool_calls``, and
reasoning is not sent back (as OpenAI-style templates drop it)."""


def text_of(content: str | list[Any], where: str) -> str:
    """The text of a message's content (a string or a list of blocks); ``where`` names the
    message in errors. Raises ``ValueError`` for blocks the engine cannot read (images, audio, files)."""
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") in _TEXT_BLOCKS:
            parts.append(str(block.get("text", "")))
        elif block.get("type") not in _SKIPPED_BLOCKS:
            raise ValueError(f"{where}.content[{i}]: a {block.get('type')!r} block; kvloom models read text only")
    return "".join(parts)


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """The OpenAI-shaped messages the chat template renders, in order."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        text = text_of(message.content, where)
        if isinstance(message, SystemMessage):
            out.append({"role": "system", "content": text})
        elif isinstance(message, HumanMessage):
            out.append({"role": "user", "content": text})
        elif isinstance(message, AIMessage):
            entry: dict[str, Any] = {"role": "assistant", "content": text}
            if message.tool_calls:
                entry["tool_calls"] = [
                    {"id": call["id"], "type": "function",
                     "function": {"name": call["name"], "arguments": json.dumps(call["args"], ensure_ascii=False)}}
                    for call in message.tool_calls
                ]
            out.append(entry)
        elif isinstance(message, ToolMessage):
            out.append({"role": "tool", "tool_call_id": message.tool_call_id, "content": text})
        elif isinstance(message, ChatMessage):
            out.append({"role": message.role, "content": text})
        elif isinstance(message, FunctionMessage):
            out.append({"role": "tool", "name": message.name, "content": text})
        else:
            raise ValueError(f"{where}: a {type(message).__name__} has no chat role")
    return out


def usage_metadata(usage: Usage) -> UsageMetadata:
    """LangChain usage: input, output and total tokens; prompt tokens served from the KV cache
    in ``input_token_details["cache_read"]``."""
    return UsageMetadata(
        input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        input_token_details=InputTokenDetails(cache_read=usage.cached_tokens),
    )


def response_metadata(model_name: str, finish_reason: str | None, incomplete: Sequence[str] = ()) -> dict[str, Any]:
    """``model_name`` and ``finish_reason``; ``incomplete_tool_calls`` (ids) when a call was cut."""
    meta: dict[str, Any] = {"model_name": model_name, "finish_reason": finish_reason}
    if incomplete:
        meta["incomplete_tool_calls"] = list(incomplete)
    return meta


def to_generation(completion: Completion, model_name: str) -> ChatGeneration:
    """A finished completion as one ``ChatGeneration`` holding an ``AIMessage``."""
    tool_calls, invalid = [], []
    for call in completion.tool_calls:
        raw = call.to_openai()
        if call.incomplete:
            invalid.append(make_invalid_tool_call(raw, str(IncompleteToolCallError(call))))
            continue
        try:
            parsed = parse_tool_call(raw, return_id=True)
        except OutputParserException as exc:
            invalid.append(make_invalid_tool_call(raw, str(exc)))
        else:
            if parsed is not None:
                tool_calls.append(parsed)
    meta = response_metadata(model_name, completion.finish_reason,
                             [c.id for c in completion.tool_calls if c.incomplete])
    message = AIMessage(
        content=completion.text, tool_calls=tool_calls, invalid_tool_calls=invalid,
        usage_metadata=usage_metadata(completion.usage), response_metadata=meta,
    )
    return ChatGeneration(message=message, generation_info=dict(meta))


class ChunkConverter:
    """One request's ``StreamChunk``s as ``ChatGenerationChunk``s. The last one (it has
    ``finish_reason``) carries the usage, the response metadata and ``chunk_position="last"``;
    earlier ones carry neither, so that adding the chunks up counts each once. A call's id comes
    once, in its first piece: it is remembered so that the last chunk can name the calls cut by
    ``max_tokens`` in ``response_metadata["incomplete_tool_calls"]``."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._ids: dict[int, str] = {}

    def convert(self, chunk: StreamChunk) -> ChatGenerationChunk:
        deltas = chunk.tool_calls or []
        self._ids.update((d.index, d.id) for d in deltas if d.id is not None)
        calls = [ToolCallChunk(name=d.name, args=d.arguments or None, id=d.id, index=d.index) for d in deltas]
        if chunk.finish_reason is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=chunk.text, tool_call_chunks=calls))
        meta = response_metadata(self.model_name, chunk.finish_reason,
                                 [self._ids[d.index] for d in deltas if d.incomplete and d.index in self._ids])
        message = AIMessageChunk(
            content=chunk.text, tool_call_chunks=calls, chunk_position="last", response_metadata=meta,
            usage_metadata=usage_metadata(chunk.usage) if chunk.usage is not None else None,
        )
        return ChatGenerationChunk(message=message, generation_info=dict(meta))

"""kvloom completions and stream chunks -> LlamaIndex ``ChatResponse`` / ``CompletionResponse``.

``raw`` is OpenAI-shaped: ``{"id", "model", "finish_reason", "usage"}`` where ``usage`` is
``{"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details":
{"cached_tokens"}}`` (what LlamaIndex's ``TokenCountingHandler`` reads); a stream's responses
carry ``usage`` on the last one only, which is the one LlamaIndex's callbacks report.

A call cut by ``max_tokens`` (``ToolCall.incomplete``) carries ``"incomplete": True`` in its
``additional_kwargs["tool_calls"]`` entry (whole responses, and a stream's last response);
complete calls are plain OpenAI dicts. ``messages.tool_selections`` refuses the marked ones.
"""

from __future__ import annotations

import copy
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse, MessageRole

from kvloom.outputs import Completion, FinishReason, StreamChunk, ToolCall, Usage


def usage_dict(usage: Usage) -> dict[str, Any]:
    """OpenAI's ``usage`` object for ``usage``."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _raw(request_id: str, model: str, finish_reason: FinishReason | None, usage: Usage | None) -> dict[str, Any]:
    raw: dict[str, Any] = {"id": request_id, "model": model, "finish_reason": finish_reason}
    if usage is not None:
        raw["usage"] = usage_dict(usage)
    return raw


def _token_counts(usage: Usage | None) -> dict[str, Any]:
    """Token counts in ``additional_kwargs``, as LlamaIndex's OpenAI LLM puts them there."""
    if usage is None:
        return {}
    counts = usage_dict(usage)
    return {k: counts[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def _call_dict(call: ToolCall) -> dict[str, Any]:
    entry = call.to_openai()
    if call.incomplete:
        entry["incomplete"] = True
    return entry


def chat_response(completion: Completion, model: str) -> ChatResponse:
    """A whole chat completion; its calls (if any) in ``message.additional_kwargs["tool_calls"]``."""
    kwargs = {"tool_calls": [_call_dict(c) for c in completion.tool_calls]} if completion.tool_calls else {}
    message = ChatMessage(role=MessageRole.ASSISTANT, content=completion.text, additional_kwargs=kwargs)
    return ChatResponse(message=message, raw=_raw(completion.request_id, model, completion.finish_reason,
                                                   completion.usage),
                        additional_kwargs=_token_counts(completion.usage))


def completion_response(completion: Completion, model: str) -> CompletionResponse:
    """A whole text completion."""
    return CompletionResponse(text=completion.text, raw=_raw(completion.request_id, model, completion.finish_reason,
                                                              completion.usage),
                              additional_kwargs=_token_counts(completion.usage))


class ChatStream:
    """Folds one request's stream chunks into LlamaIndex's streamed ``ChatResponse``s: each
    holds the text so far (``message.content``), the new text (``delta``) and the calls so far
    (OpenAI dicts whose ``arguments`` grow chunk by chunk; each response owns its copy)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.text = ""
        self.calls: list[dict[str, Any]] = []

    def add(self, chunk: StreamChunk) -> ChatResponse:
        self.text += chunk.text
        for delta in chunk.tool_calls or ():
            while len(self.calls) <= delta.index:
                self.calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            call = self.calls[delta.index]
            if delta.id is not None:
                call["id"] = delta.id
            if delta.name is not None:
                call["function"]["name"] = delta.name
            call["function"]["arguments"] += delta.arguments
            if delta.incomplete:
                call["incomplete"] = True
        kwargs = {"tool_calls": copy.deepcopy(self.calls)} if self.calls else {}
        message = ChatMessage(role=MessageRole.ASSISTANT, content=self.text, additional_kwargs=kwargs)
        return ChatResponse(message=message, delta=chunk.text,
                            raw=_raw(chunk.request_id, self.model, chunk.finish_reason, chunk.usage),
                            additional_kwargs=_token_counts(chunk.usage))


class CompletionStream:
    """Folds one request's stream chunks into streamed ``CompletionResponse``s (text so far, delta)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.text = ""

    def add(self, chunk: StreamChunk) -> CompletionResponse:
        self.text += chunk.text
        return CompletionResponse(text=self.text, delta=chunk.text,
                                  raw=_raw(chunk.request_id, self.model, chunk.finish_reason, chunk.usage),
                                  additional_kwargs=_token_counts(chunk.usage))

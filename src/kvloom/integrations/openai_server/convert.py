"""kvloom's outputs -> OpenAI's JSON: completions, chat completions, their stream chunks, usage
and logprobs.

Everything here is a pure function of kvloom's ``Completion`` / ``StreamChunk`` (plus the
tokenizer, for token strings in logprobs), so a streamed request and the same request run to
the end produce the same content: deltas concatenate to the final text and tool calls.
kvloom's finish reasons that OpenAI lacks (``abort``, ``error``) pass through as they are.

A tool call the output ended inside (cut by ``max_tokens``: ``finish_reason="length"``, its
``arguments`` not valid JSON) carries ``"incomplete": true``, kvloom's one addition to OpenAI's
shape: on its ``message.tool_calls[i]``, and streamed on a ``delta.tool_calls[i]`` of the last
chunk. Complete calls have no such key, so their JSON is exactly OpenAI's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvloom.outputs import Choice, Completion, StreamChunk, TokenLogprob, ToolCall, ToolCallDelta, Usage


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What every response and chunk of one request repeats."""

    id: str
    created: int
    model: str


def usage_json(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def _token(tokenizer: Any | None, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    text: str = tokenizer.decode([token_id])
    return text


def chat_logprobs(logprobs: list[TokenLogprob] | None, tokenizer: Any | None) -> dict[str, Any] | None:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": None}``."""
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = _token(tokenizer, token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
               for lp in logprobs]
    return {"content": content, "refusal": None}


def completion_logprobs(logprobs: list[TokenLogprob] | None, tokenizer: Any | None,
                        text_offset: int = 0) -> dict[str, Any] | None:
    """The legacy shape: ``tokens``, ``token_logprobs``, ``top_logprobs`` (token -> logprob) and
    ``text_offset`` (each token's start in the generated text, from ``text_offset``)."""
    if logprobs is None:
        return None
    tokens = [_token(tokenizer, lp.token_id) for lp in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{_token(tokenizer, t): v for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets}


def _tool_call(call: ToolCall) -> dict[str, Any]:
    out = call.to_openai()
    if call.incomplete:
        out["incomplete"] = True
    return out


def _message(choice: Choice) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
    if choice.tool_calls:
        message["content"] = choice.text or None
        message["tool_calls"] = [_tool_call(call) for call in choice.tool_calls]
    return message


def chat_completion(completion: Completion, meta: ResponseMeta, tokenizer: Any | None) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    choices = [{"index": c.index, "message": _message(c), "logprobs": chat_logprobs(c.logprobs, tokenizer),
                "finish_reason": c.finish_reason} for c in completion.choices]
    return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": usage_json(completion.usage), "system_fingerprint": None}


def text_completion(completion: Completion, meta: ResponseMeta, tokenizer: Any | None) -> dict[str, Any]:
    """A ``text_completion`` object."""
    choices = [{"index": c.index, "text": c.text, "logprobs": completion_logprobs(c.logprobs, tokenizer),
                "finish_reason": c.finish_reason} for c in completion.choices]
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": usage_json(completion.usage), "system_fingerprint": None}


def _tool_call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    """OpenAI's ``delta.tool_calls[i]``: ``id``, ``type`` and the name come once, first."""
    out: dict[str, Any] = {"index": delta.index, "function": {"arguments": delta.arguments}}
    if delta.id is not None:
        out["id"] = delta.id
        out["type"] = "function"
    if delta.name is not None:
        out["function"]["name"] = delta.name
    if delta.incomplete:
        out["incomplete"] = True
    return out


@dataclass(slots=True)
class ChunkWriter:
    """Turns one request's ``StreamChunk``s into OpenAI chunk objects (``chat.completion.chunk``
    when ``chat``, else ``text_completion``). A chat choice's first chunk carries
    ``role: "assistant"``; with ``include_usage`` every chunk has ``usage: null`` and ``usage_chunk``
    gives the last one (empty ``choices``)."""

    meta: ResponseMeta
    chat: bool
    include_usage: bool
    tokenizer: Any | None
    _started: set[int] = field(default_factory=set)
    _text_len: dict[int, int] = field(default_factory=dict)

    def chunk(self, piece: StreamChunk) -> dict[str, Any] | None:
        """The chunk for ``piece``; None when it carries nothing to send (only the usage that
        ``usage_chunk`` sends)."""
        empty = not piece.text and not piece.tool_calls and piece.finish_reason is None and not piece.logprobs
        if empty and (not self.chat or piece.index in self._started):
            return None
        choice: dict[str, Any] = {"index": piece.index}
        if self.chat:
            delta: dict[str, Any] = {}
            if piece.index not in self._started:
                self._started.add(piece.index)
                delta = {"role": "assistant", "content": ""}
            if piece.text:
                delta["content"] = piece.text
            if piece.tool_calls:
                delta["tool_calls"] = [_tool_call_delta(d) for d in piece.tool_calls]
            choice["delta"] = delta
            choice["logprobs"] = chat_logprobs(piece.logprobs, self.tokenizer)
        else:
            offset = self._text_len.get(piece.index, 0)
            self._text_len[piece.index] = offset + len(piece.text)
            choice["text"] = piece.text
            choice["logprobs"] = completion_logprobs(piece.logprobs, self.tokenizer, offset)
        choice["finish_reason"] = piece.finish_reason
        return self._wrap([choice], None)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return self._wrap([], usage_json(usage))

    def _wrap(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.meta.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.meta.created, "model": self.meta.model, "choices": choices,
               "system_fingerprint": None}
        if self.include_usage:
            out["usage"] = usage
        return out

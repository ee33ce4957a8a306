"""An OpenAI request body -> kvloom's ``SamplingParams`` and ``generate``/``stream`` arguments.

Only the fields the client set are passed, so kvloom's defaults hold for the rest. A value
kvloom refuses raises a 400 that names the field as the client sent it (``max_completion_tokens``,
``top_logprobs``), not kvloom's name for it.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from kvloom.integrations.openai_server.errors import bad_request, from_exception
from kvloom.integrations.openai_server.schemas import BaseRequest, ChatCompletionRequest, CompletionRequest
from kvloom.params import SamplingParams

COMPLETIONS_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for ``/v1/completions``."""

_PASSED_AS_IS = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "top_k",
                 "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids")


RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "choice", "grammar")
"""What ``response_format.type`` may be: OpenAI's three, then kvloom's own."""


def response_format(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's ``response_format``: ``text`` is no constraint; ``json_schema`` needs its
    ``schema``; ``json_object`` (and kvloom's ``regex``/``choice``/``grammar``) go to kvloom as is.
    ``type`` is required, as in OpenAI's API (kvloom's in-process forms without it, such as a
    bare JSON schema, are not read here), and must be one of ``RESPONSE_FORMAT_TYPES``."""
    if value is None:
        return None
    kind = value.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        got = "missing" if kind is None else f"unsupported type {kind!r}"
        raise bad_request("response_format.type", f"{got}; supported types: {', '.join(RESPONSE_FORMAT_TYPES)}")
    if kind == "text":
        return None
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
            raise bad_request("response_format.json_schema.schema", "a JSON schema object is required")
    return value


def _build(request: BaseRequest, extra: dict[str, Any], rename: dict[str, str]) -> SamplingParams:
    fields = {name: getattr(request, name) for name in _PASSED_AS_IS if getattr(request, name) is not None}
    fields.update({k: v for k, v in extra.items() if v is not None})
    fields["response_format"] = response_format(request.response_format)
    try:
        return SamplingParams(**fields)
    except ValidationError as exc:
        raise from_exception(exc, rename) from exc


def client_names(request: BaseRequest) -> dict[str, str]:
    """kvloom's field name -> the name this request sent it under (for the 400's ``param``)."""
    if not isinstance(request, ChatCompletionRequest):
        return {}
    names = {"logprobs": "top_logprobs"}
    if request.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    return names


def chat_params(request: ChatCompletionRequest) -> SamplingParams:
    max_tokens = request.max_completion_tokens or request.max_tokens
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return _build(request, {"max_tokens": max_tokens, "logprobs": logprobs}, client_names(request))


def completion_params(request: CompletionRequest) -> SamplingParams:
    return _build(request, {"max_tokens": request.max_tokens or COMPLETIONS_MAX_TOKENS,
                            "logprobs": request.logprobs}, {})


def chat_tools(request: ChatCompletionRequest) -> dict[str, Any]:
    """``tools`` / ``tool_choice`` / ``parallel_tool_calls`` for ``generate``/``stream`` (an
    empty ``tools`` list, which some clients send, means no tools)."""
    if not request.tools:
        return {"tool_choice": request.tool_choice} if request.tool_choice not in (None, "none") else {}
    return {"tools": request.tools, "tool_choice": request.tool_choice,
            "parallel_tool_calls": request.parallel_tool_calls}

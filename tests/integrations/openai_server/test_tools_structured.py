"""Tool calls and structured output through the official client: a required call names an
allowed tool with arguments that validate; its streamed deltas (id, type and name first, then
argument fragments) add up to the same call; JSON schemas and json_object constrain the text."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.integrations.openai_server.conftest import MODEL, user
from tests.structured.grammar_helpers import assert_valid_or_prefix

pytestmark = pytest.mark.asyncio(loop_scope="package")

# Enums keep each call short on a random model (it would fill free strings to max_tokens).
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
           "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now.", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time now.", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


async def test_a_required_call_validates_and_its_stream_adds_up_to_it(client: openai.AsyncOpenAI) -> None:
    args: dict[str, Any] = dict(model=MODEL, messages=user("Weather in Paris?"), tools=TOOLS, tool_choice="required",
                                parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=1)

    async def streamed() -> list[Any]:
        return [chunk async for chunk in await client.chat.completions.create(stream=True, **args)]

    done, chunks = await asyncio.gather(client.chat.completions.create(**args), streamed())  # one batch
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in SCHEMAS
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])

    deltas = [d for chunk in chunks for c in chunk.choices for d in c.delta.tool_calls or []]
    first, *rest = deltas
    assert first.index == 0 and first.id is not None and first.id.startswith("call_") and first.type == "function"
    assert first.function is not None and first.function.name == call.function.name
    assert all(d.index == 0 and d.id is None and d.function is not None and d.function.name is None for d in rest)
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function is not None)
    assert arguments == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices) == (choice.message.content or "")


async def test_json_schema_output_validates(client: openai.AsyncOpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    done = await client.chat.completions.create(
        model=MODEL, messages=user("The weather, as JSON."), max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}})
    assert done.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(done.choices[0].message.content or ""), schema)


async def test_json_object_output_is_a_json_object(client: openai.AsyncOpenAI) -> None:
    fmt: Any = {"type": "json_object"}
    done = await client.chat.completions.create(model=MODEL, messages=user("json"), max_tokens=16, temperature=1.0,
                                                seed=0, n=8, response_format=fmt)
    for c in done.choices:  # whole objects when they stop, prefixes of one when cut (a random model rarely stops)
        assert_valid_or_prefix(c.message.content or "", c.finish_reason, fmt)
    finished = [c.message.content or "" for c in done.choices if c.finish_reason == "stop"]
    assert finished, "no choice closed its object: the check above tested prefixes only"
    assert all(isinstance(json.loads(text), dict) for text in finished)


async def test_text_response_format_is_unconstrained(client: openai.AsyncOpenAI) -> None:
    args: dict[str, Any] = dict(model=MODEL, messages=user("Hello"), max_tokens=4, temperature=0)
    plain = await client.chat.completions.create(**args)
    text = await client.chat.completions.create(response_format={"type": "text"}, **args)
    assert text.choices[0].message.content == plain.choices[0].message.content

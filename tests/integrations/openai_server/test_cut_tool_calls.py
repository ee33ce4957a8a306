"""A tool call cut by ``max_tokens``, as an agent loop meets it: the response says so
(``finish_reason="length"``, ``"incomplete": true`` on the call, streamed or not), and the
conversation goes back as the agent has it (the assistant message with the cut call, then the
tool's result): accepted, and the call's text reaches the chat template verbatim."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from kvloom import AsyncEngine
from tests.integrations.openai_server.conftest import MODEL, prompt_len, user

pytestmark = pytest.mark.asyncio(loop_scope="package")

# A free string: a random model writes it until max_tokens, so the call is cut inside its arguments.
TOOLS: list[Any] = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now.",
                                                       "parameters": {"type": "object", "required": ["city"],
                                                                      "properties": {"city": {"type": "string"}}}}}]
CUT: dict[str, Any] = dict(model=MODEL, messages=user("Weather in Paris?"), tools=TOOLS, tool_choice="required",
                           max_tokens=48, temperature=1.0, seed=0)
"""The call's head (``<tool_call>`` and the name) takes about 36 of the 48 tokens."""


async def test_a_cut_call_is_marked_incomplete_streamed_or_not(client: openai.AsyncOpenAI) -> None:
    done = await client.chat.completions.create(**CUT)
    choice = done.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments.startswith('{"city"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.function.arguments)
    assert call.model_extra == {"incomplete": True}

    chunks = [chunk async for chunk in await client.chat.completions.create(stream=True, **CUT)]
    deltas = [d for chunk in chunks for c in chunk.choices for d in c.delta.tool_calls or []]
    assert "".join(d.function.arguments or "" for d in deltas if d.function) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "length"
    marked = [d for d in deltas if (d.model_extra or {}).get("incomplete")]
    assert len(marked) == 1 and marked[0] in chunks[-1].choices[0].delta.tool_calls  # type: ignore[operator]


async def test_a_complete_call_has_no_incomplete_key(client: openai.AsyncOpenAI) -> None:
    enum = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
        "additionalProperties": False}}}]
    done = await client.chat.completions.create(**{**CUT, "tools": enum, "max_tokens": 120,
                                                   "parallel_tool_calls": False})
    assert done.choices[0].finish_reason == "tool_calls" and done.choices[0].message.tool_calls
    assert all(not call.model_extra for call in done.choices[0].message.tool_calls)


async def test_the_agent_sends_its_cut_call_back_and_the_template_gets_it_verbatim(
    client: openai.AsyncOpenAI, engine: AsyncEngine,
) -> None:
    done = await client.chat.completions.create(**CUT)
    assistant = done.choices[0].message
    assert assistant.tool_calls is not None
    call = assistant.tool_calls[0]
    history: list[Any] = [*CUT["messages"], assistant.model_dump(exclude_none=True),  # as the client returned it
                          {"role": "tool", "tool_call_id": call.id, "content": "max_tokens cut the call; retry"}]

    again = await client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=2)
    assert again.choices[0].finish_reason in ("length", "stop", "tool_calls")

    # The template got the arguments as the text they are (its `is string` branch writes them as is).
    def rendered(arguments: Any) -> list[dict[str, Any]]:
        entry = {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        return [*CUT["messages"], {"role": "assistant", "content": "", "tool_calls": [entry]},
                {"role": "tool", "tool_call_id": call.id, "content": history[-1]["content"]}]

    assert engine.tokenizer is not None
    text = engine.tokenizer.apply_chat_template(rendered(call.function.arguments), tools=TOOLS, tokenize=False)
    assert f'"arguments": {call.function.arguments}}}\n</tool_call>' in text
    assert again.usage is not None
    assert again.usage.prompt_tokens == prompt_len(engine, rendered(call.function.arguments), TOOLS)
    quoted = prompt_len(engine, rendered(json.dumps(call.function.arguments)), TOOLS)  # what tojson would write
    assert again.usage.prompt_tokens != quoted

"""Tool calling through LlamaIndex's ``FunctionCallingLLM`` API: calls constrained by kvloom
(valid against the tool's schema even on random weights), OpenAI-shaped in
``additional_kwargs["tool_calls"]``, streamed as growing calls, and tool results rendered back
by the checkpoint's chat template.

No ``from __future__ import annotations`` here: LlamaIndex builds a tool's schema from its
function's annotations, which must be real types, not strings."""

import json
from itertools import pairwise
from pathlib import Path
from typing import Literal

import pytest
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field
from transformers import AutoTokenizer

from kvloom.integrations.llama_index import KVLoomLLM
from kvloom.integrations.llama_index.messages import to_openai_messages

CALLS: list[tuple[str, str]] = []


def get_weather(city: Literal["Paris", "Rome", "Oslo"], unit: Literal["C", "F"]) -> str:
    """The current weather in a city."""
    CALLS.append((city, unit))
    return f"sunny in {city}, 21 {unit}"


class Booking(BaseModel):
    """LlamaIndex drops ``Annotated`` bounds from a function's signature: an explicit schema keeps them."""

    guests: int = Field(ge=1, le=8)
    note: str = Field(max_length=8)


def book_table(guests: int, note: str) -> str:
    return f"booked for {guests}"


WEATHER = FunctionTool.from_defaults(fn=get_weather, description="The current weather in a city.")
BOOKING = FunctionTool.from_defaults(fn=book_table, fn_schema=Booking, description="Book a restaurant table.")
ASK = "What is the weather in Paris?"


def test_chat_with_tools_gives_a_valid_call_as_openai_dicts_and_tool_selections(llm: KVLoomLLM) -> None:
    response = llm.chat_with_tools([WEATHER, BOOKING], user_msg=ASK, tool_required=True, max_tokens=120)
    assert response.raw["finish_reason"] == "tool_calls"
    calls = response.message.additional_kwargs["tool_calls"]
    assert len(calls) == 1 and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    selections = llm.get_tool_calls_from_response(response)
    assert [(s.tool_id, s.tool_name) for s in selections] == [(calls[0]["id"], calls[0]["function"]["name"])]
    assert selections[0].tool_kwargs == json.loads(calls[0]["function"]["arguments"])
    tool = {"get_weather": WEATHER, "book_table": BOOKING}[selections[0].tool_name]
    assert tool.metadata.fn_schema is not None
    tool.metadata.fn_schema.model_validate(selections[0].tool_kwargs)  # the schema holds: constrained decoding


@pytest.mark.asyncio
async def test_achat_with_tools_honours_a_named_tool_and_none(llm: KVLoomLLM) -> None:
    named = await llm.achat_with_tools([WEATHER, BOOKING], user_msg=ASK, tool_choice="book_table",
                                       temperature=1.0, seed=0, max_tokens=120)
    selections = llm.get_tool_calls_from_response(named)
    assert [s.tool_name for s in selections] == ["book_table"]
    Booking.model_validate(selections[0].tool_kwargs)
    none = await llm.achat_with_tools([WEATHER], user_msg=ASK, tool_choice="none", max_tokens=4)
    assert llm.get_tool_calls_from_response(none, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="0 tool calls"):
        llm.get_tool_calls_from_response(none)


def test_streamed_calls_grow_and_add_up_to_the_whole_call(llm: KVLoomLLM) -> None:
    whole = llm.chat_with_tools([WEATHER], user_msg=ASK, tool_required=True, max_tokens=120)
    streamed = list(llm.stream_chat_with_tools([WEATHER], user_msg=ASK, tool_required=True, max_tokens=120))
    growing = [r.message.additional_kwargs.get("tool_calls", []) for r in streamed]
    with_call = [calls[0] for calls in growing if calls]
    assert len(with_call) > 2, "the call arrives over several responses"
    assert len({c["id"] for c in with_call}) == 1 and {c["function"]["name"] for c in with_call} == {"get_weather"}
    arguments = [c["function"]["arguments"] for c in with_call]
    assert all(later.startswith(earlier) for earlier, later in pairwise(arguments))
    expected = whole.message.additional_kwargs["tool_calls"][0]["function"]["arguments"]
    assert arguments[-1] == expected and streamed[-1].raw["finish_reason"] == "tool_calls"
    assert "<tool_call>" not in (streamed[-1].message.content or "")  # markup never reaches the text


def test_a_tool_result_round_trips_through_the_chat_template(llm: KVLoomLLM, demo_dir: Path) -> None:
    user = ChatMessage(role=MessageRole.USER, content=ASK)
    call = llm.chat_with_tools([WEATHER], user_msg=user, tool_required=True, max_tokens=120)
    selection = llm.get_tool_calls_from_response(call)[0]
    result = ChatMessage(role=MessageRole.TOOL, content="sunny, 21 C", additional_kwargs={"tool_call_id": selection.tool_id})
    history = [user, call.message, result]
    converted = llm.convert_chat_messages(history)
    assert converted == [
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": call.message.content,
         "tool_calls": call.message.additional_kwargs["tool_calls"]},
        {"role": "tool", "content": "sunny, 21 C", "tool_call_id": selection.tool_id},
    ]
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    text = tokenizer.apply_chat_template(converted, tools=[WEATHER.metadata.to_openai_tool()], tokenize=False,
                                         add_generation_prompt=True)
    assert '<tool_call>\n{"name": "get_weather", "arguments": ' in text
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    answer = llm.chat_with_tools([WEATHER], chat_history=history, max_tokens=3)  # the next turn
    assert answer.raw["usage"]["prompt_tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_predict_and_call_runs_the_chosen_tool(llm: KVLoomLLM) -> None:
    CALLS.clear()
    out = llm.predict_and_call([WEATHER], user_msg=ASK, tool_choice="required", max_tokens=120)
    assert len(CALLS) == 1 and out.response == "sunny in {}, 21 {}".format(*CALLS[0])
    assert out.sources[0].tool_name == "get_weather" and not out.sources[0].is_error


@pytest.mark.asyncio
async def test_a_function_agent_streams_a_call_and_runs_the_tool(llm: KVLoomLLM) -> None:
    """LlamaIndex's agent loop: streamed chat with tools, calls read from the growing responses;
    the tool returns directly, so the run is one model call."""
    CALLS.clear()
    direct = FunctionTool.from_defaults(fn=get_weather, description="The current weather in a city.", return_direct=True)
    roomy = KVLoomLLM(engine=llm.runtime.start(), temperature=0.0, max_tokens=120)  # room for the whole call
    agent = FunctionAgent(tools=[direct], llm=roomy, initial_tool_choice="get_weather", streaming=True,
                          allow_parallel_tool_calls=False)
    handler = agent.run(ASK)
    results = [e async for e in handler.stream_events() if isinstance(e, ToolCallResult)]
    output = await handler
    assert len(CALLS) == 1 and {(r.tool_id, r.tool_name) for r in results} == {(results[0].tool_id, "get_weather")}
    assert str(output) == "sunny in {}, 21 {}".format(*CALLS[0])


def test_calls_written_by_other_llms_convert_and_unreadable_blocks_fail_by_name() -> None:
    assistant = ChatMessage(role=MessageRole.ASSISTANT, blocks=[
        TextBlock(text="Checking."), ToolCallBlock(tool_call_id="c1", tool_name="get_weather",
                                                    tool_kwargs={"city": "Rome", "unit": "C"})])
    assert to_openai_messages([assistant]) == [{"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": '{"city": "Rome", "unit": "C"}'}}]}]
    picture = ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text="Look:"), ImageBlock(url="http://x/y.png")])
    with pytest.raises(ValueError, match=r"messages\[1\]\.blocks\[1\]: ImageBlock"):
        to_openai_messages([assistant, picture])
    broken = ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs={"tool_calls": [{"id": "c2"}]})
    with pytest.raises(ValueError, match=r"messages\[0\]\.additional_kwargs\['tool_calls'\]\[0\]\.function\.name"):
        to_openai_messages([broken])

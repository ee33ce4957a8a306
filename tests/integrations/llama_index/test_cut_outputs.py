"""Replies cut by ``max_tokens`` say so through ``KVLoomLLM``: a cut call is marked
``"incomplete"`` in ``additional_kwargs["tool_calls"]`` (whole or streamed), and reading it as a
tool selection (``get_tool_calls_from_response``, ``predict_and_call``, agents) raises an error
saying it was cut by max_tokens instead of running the tool on partial arguments.

A scripted reply (``ScriptedReplies``, as a per-call logits processor) writes a known call;
``max_tokens`` ends it inside its arguments, so the cut is the only thing under test.

No ``from __future__ import annotations`` here: LlamaIndex builds a tool's schema from its
function's annotations, which must be real types, not strings."""

from pathlib import Path
from typing import Any, Literal

import pytest
from llama_index.core.tools import FunctionTool
from transformers import AutoTokenizer

from kvloom.integrations.llama_index import KVLoomLLM
from kvloom.outputs import IncompleteToolCallError
from tests.integrations.langchain.scripted import ScriptedReplies, tool_call

CALLS: list[str] = []


def get_weather(city: Literal["Paris", "Rome", "Oslo"]) -> str:
    """The current weather in a city."""
    CALLS.append(city)
    return f"sunny in {city}"


WEATHER = FunctionTool.from_defaults(fn=get_weather)
REPLY = tool_call("get_weather", '{"city":"Paris"}')
CUT = r"'get_weather'.*cut by max_tokens \(finish_reason='length'\).*raise max_tokens"


@pytest.fixture
def cut(demo_dir: Path) -> dict[str, Any]:
    """Per-call arguments that make the reply a ``get_weather`` call cut inside ``"Par``."""
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    written = len(tokenizer.encode(REPLY[:REPLY.index('"Par') + 4], add_special_tokens=False))
    return {"max_tokens": written, "logits_processors": [ScriptedReplies(demo_dir, REPLY)], "tool_required": True}


def test_a_cut_call_is_marked_and_refused_as_a_tool_selection(llm: KVLoomLLM, cut: dict[str, Any]) -> None:
    response = llm.chat_with_tools([WEATHER], user_msg="Weather in Paris?", **cut)
    assert response.raw["finish_reason"] == "length"
    [call] = response.message.additional_kwargs["tool_calls"]
    arguments = call["function"]["arguments"]
    assert call["function"]["name"] == "get_weather" and call["incomplete"] is True
    assert arguments.startswith('{"city":"Par') and '{"city":"Paris"}'.startswith(arguments) and arguments[-1] != "}"
    with pytest.raises(IncompleteToolCallError, match=CUT):  # it gave the partial {"city": "Par..."}
        llm.get_tool_calls_from_response(response)
    with pytest.raises(ValueError, match=CUT):
        llm.get_tool_calls_from_response(response, error_on_no_tool_call=False)


def test_predict_and_call_does_not_run_a_cut_call(llm: KVLoomLLM, cut: dict[str, Any]) -> None:
    """The partial arguments may even validate (``{"city": "Paris`` reads as Paris): the call still is not run."""
    CALLS.clear()
    with pytest.raises(IncompleteToolCallError, match=CUT):
        llm.predict_and_call([WEATHER], user_msg="Weather in Paris?", **cut)
    assert CALLS == []


def test_a_streamed_cut_call_is_marked_in_the_last_response(llm: KVLoomLLM, cut: dict[str, Any]) -> None:
    """As LlamaIndex's agents read a stream: the calls of every response so far; the last says the call was cut."""
    responses = list(llm.stream_chat_with_tools([WEATHER], user_msg="Weather in Paris?", **cut))
    growing = [r for r in responses[:-1] if r.message.additional_kwargs.get("tool_calls")]
    assert growing, "the call arrives while the reply streams"
    for partial in growing:  # still streaming: partial arguments, not an error
        assert "incomplete" not in partial.message.additional_kwargs["tool_calls"][0]
        llm.get_tool_calls_from_response(partial, error_on_no_tool_call=False)
    last = responses[-1]
    assert last.raw["finish_reason"] == "length" and last.message.additional_kwargs["tool_calls"][0]["incomplete"]
    with pytest.raises(IncompleteToolCallError, match=CUT):
        llm.get_tool_calls_from_response(last, error_on_no_tool_call=False)

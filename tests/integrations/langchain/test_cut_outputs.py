"""Replies cut by ``max_tokens`` say so at every LangChain door: a cut tool call is an
``invalid_tool_call`` whose error names the cause, the response metadata lists it (invoked or
streamed), and ``with_structured_output`` raises (or, with ``include_raw``, reports) an error
saying "cut by max_tokens" instead of returning ``None`` or a partial object.

A scripted reply (``ScriptedReplies``) writes a known call or JSON object; ``max_tokens``
ends it at a known token, inside the arguments, so the cut is the only thing under test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, AIMessageChunk
from pydantic import BaseModel
from transformers import AutoTokenizer

from kvloom.integrations.langchain import ChatKVLoom
from kvloom.integrations.runtime import EngineRuntime
from tests.integrations.langchain.scripted import ScriptedReplies, tool_call

ARGUMENTS = '{"name":"Ada Lovelace","age":36}'
"""Compact, as the grammars write JSON."""
CUT = "cut by max_tokens \\(finish_reason='length'\\).*raise max_tokens"


class Person(BaseModel):
    name: str
    age: int


PERSON_JSON = {"title": "Person", "type": "object", "properties": {"name": {"type": "string"}, "age": {
    "type": "integer"}}, "required": ["name", "age"]}


def tokens_up_to(demo_dir: Path, reply: str, end: str) -> int:
    """How many tokens the scripted ``reply`` has written when it reaches ``end`` (a piece of it)."""
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    return len(tokenizer.encode(reply[:reply.index(end) + len(end)], add_special_tokens=False))


@pytest.fixture
def cut_call(demo_runtime: EngineRuntime, demo_dir: Path) -> ChatKVLoom:
    """A chat model whose replies are a ``Person`` call cut inside ``"Ada``."""
    reply = tool_call("Person", ARGUMENTS)
    script = ScriptedReplies(demo_dir, reply)
    return ChatKVLoom(engine=demo_runtime, temperature=0, max_tokens=tokens_up_to(demo_dir, reply, '"Ada'),
                      logits_processors=[script])


@pytest.fixture
def cut_json(demo_runtime: EngineRuntime, demo_dir: Path) -> ChatKVLoom:
    """A chat model whose replies are a ``Person`` object cut inside ``"Ada``."""
    script = ScriptedReplies(demo_dir, ARGUMENTS)
    return ChatKVLoom(engine=demo_runtime, temperature=0, max_tokens=tokens_up_to(demo_dir, ARGUMENTS, '"Ada'),
                      logits_processors=[script])


def test_a_cut_call_is_an_invalid_tool_call_naming_the_cause(cut_call: ChatKVLoom) -> None:
    message = cut_call.bind_tools([Person], tool_choice="Person").invoke("Who?")
    assert isinstance(message, AIMessage) and message.response_metadata["finish_reason"] == "length"
    assert message.tool_calls == [], "a cut call is not a call to run"
    [invalid] = message.invalid_tool_calls
    assert invalid["name"] == "Person" and invalid["args"] == '{"name":"Ada'
    assert invalid["error"] is not None and "cut by max_tokens (finish_reason='length')" in invalid["error"]
    assert message.response_metadata["incomplete_tool_calls"] == [invalid["id"]]


def test_a_cut_call_in_a_stream_is_listed_in_the_last_chunk(cut_call: ChatKVLoom) -> None:
    total: Any = None
    for chunk in cut_call.bind_tools([Person], tool_choice="Person").stream("Who?"):
        assert isinstance(chunk, AIMessageChunk)
        total = chunk if total is None else total + chunk
    assert total.response_metadata["finish_reason"] == "length"
    [call] = total.tool_call_chunks
    assert call["name"] == "Person" and total.response_metadata["incomplete_tool_calls"] == [call["id"]]


@pytest.mark.parametrize("schema", [Person, PERSON_JSON], ids=["pydantic", "json_schema_dict"])
def test_function_calling_structured_output_raises_saying_it_was_cut(cut_call: ChatKVLoom, schema: Any) -> None:
    structured = cut_call.with_structured_output(schema, method="function_calling")
    with pytest.raises(OutputParserException, match=f"Person.*{CUT}"):  # it returned None
        structured.invoke("Who?")
    with pytest.raises(OutputParserException, match=CUT):
        list(structured.stream("Who?"))
    raw = cut_call.with_structured_output(schema, method="function_calling", include_raw=True).invoke("Who?")
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], OutputParserException)
    assert "cut by max_tokens" in str(raw["parsing_error"])


@pytest.mark.parametrize("schema", [Person, PERSON_JSON], ids=["pydantic", "json_schema_dict"])
@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_json_structured_output_raises_saying_it_was_cut(cut_json: ChatKVLoom, schema: Any, method: str) -> None:
    structured = cut_json.with_structured_output(schema, method=method)  # type: ignore[arg-type]
    with pytest.raises(OutputParserException, match=CUT):  # a bare parse error, or a partial dict
        structured.invoke("Who?")
    with pytest.raises(OutputParserException, match=CUT):
        list(structured.stream("Who?"))
    raw = cut_json.with_structured_output(schema, method=method, include_raw=True).invoke("Who?")  # type: ignore[arg-type]
    assert raw["parsed"] is None and "cut by max_tokens" in str(raw["parsing_error"])


def test_an_answer_that_closed_exactly_at_max_tokens_parses(demo_runtime: EngineRuntime, demo_dir: Path) -> None:
    """``finish_reason="length"`` alone is no cut: the object had closed."""
    reply = tool_call("Person", ARGUMENTS)
    whole = {"json": (ARGUMENTS, ARGUMENTS[-1]), "call": (reply, ARGUMENTS)}
    chat = {kind: ChatKVLoom(engine=demo_runtime, temperature=0, max_tokens=tokens_up_to(demo_dir, text, end),
                             logits_processors=[ScriptedReplies(demo_dir, text)])
            for kind, (text, end) in whole.items()}
    expected = Person(name="Ada Lovelace", age=36)
    assert chat["json"].with_structured_output(Person, method="json_schema").invoke("Who?") == expected
    assert chat["call"].with_structured_output(Person, method="function_calling").invoke("Who?") == expected


def test_an_untitled_json_schema_is_called_the_answer(cut_json: ChatKVLoom) -> None:
    untitled = {k: v for k, v in PERSON_JSON.items() if k != "title"}
    with pytest.raises(OutputParserException, match=f"the answer JSON was {CUT}"):
        cut_json.with_structured_output(untitled, method="json_mode").invoke("Who?")

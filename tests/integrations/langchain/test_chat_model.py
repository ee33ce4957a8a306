"""ChatKVLoom and KVLoom beyond the standard suites: construction that loads nothing and names
bad fields, history conversion, sync calls inside a running loop, adapters by ``model=``,
structured output with ``include_raw``, and the completion LLM's batches."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import BaseModel, ValidationError

from kvloom import InvalidRequestError
from kvloom.integrations.langchain import ChatKVLoom, KVLoom
from kvloom.integrations.langchain.messages import to_chat_messages
from kvloom.integrations.runtime import EngineRuntime
from tests.integrations.langchain.scripted import ScriptedReplies


def test_construction_loads_nothing_and_names_bad_fields() -> None:
    chat = ChatKVLoom(model_path="/no/such/checkpoint", temperature=0.2)
    assert chat.model == "checkpoint" and chat._runtime is None  # no engine, no thread, no file read
    with pytest.raises(ValidationError, match=r"engine= .* or model_path="):
        ChatKVLoom()
    with pytest.raises(ValidationError, match="api_key"):
        ChatKVLoom(model_path="/x", api_key="sk")
    with pytest.raises(ValidationError, match="temperature"):
        ChatKVLoom(model_path="/x", temperature=-1)


def test_histories_go_to_the_template_in_the_openai_shape() -> None:
    call = {"name": "add", "args": {"a": 1, "b": 2}, "id": "call_1", "type": "tool_call"}
    messages = to_chat_messages([
        SystemMessage("be brief"), HumanMessage([{"type": "text", "text": "1 + 2?"}]),
        AIMessage([{"type": "text", "text": "let me add"}, {"type": "tool_use", "id": "call_1", "name": "add",
                                                          "input": {"a": 1, "b": 2}}], tool_calls=[call]),
        ToolMessage("3", tool_call_id="call_1"),
    ])
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "1 + 2?"},
        {"role": "assistant", "content": "let me add", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    with pytest.raises(ValueError, match=r"messages\[0\].content\[1\]: a 'image' block"):
        to_chat_messages([HumanMessage([{"type": "text", "text": "see"}, {"type": "image", "url": "http://x"}])])


def test_calls_name_bad_arguments(demo_runtime: EngineRuntime) -> None:
    chat = ChatKVLoom(engine=demo_runtime, max_tokens=2)
    with pytest.raises(ValueError, match=r"^frobnicate: not an argument"):
        chat.invoke("hi", frobnicate=1)
    with pytest.raises(ValidationError, match="top_p"):
        chat.invoke("hi", top_p=3.0)
    with pytest.raises(ValueError, match="tool_choice"):
        chat.bind_tools([], tool_choice=3)


def test_sync_calls_work_inside_a_running_loop(demo_runtime: EngineRuntime) -> None:
    """A notebook cell (a running loop) calling the sync API: served by the engine's own thread."""
    chat = ChatKVLoom(engine=demo_runtime, temperature=0, max_tokens=4)

    async def cell() -> tuple[str, str]:
        streamed = "".join(str(c.content) for c in chat.stream("hi"))
        return str(chat.invoke("hi").content), streamed

    invoked, streamed = asyncio.run(cell())
    assert invoked == streamed and invoked


def test_model_selects_a_lora_adapter_by_name(llama_dir: Path, tmp_path: Path) -> None:
    from tests.lora.peft_helpers import make_peft_adapter

    adapter = make_peft_adapter(llama_dir, tmp_path / "tenant", r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    chat = ChatKVLoom(model_path=llama_dir, model="base", temperature=0, max_tokens=6,
                      engine_kwargs={"max_loras": 1, "max_lora_rank": 8})
    try:
        chat.runtime.run(lambda engine: engine.load_adapter("tenant", adapter))
        base, tuned = chat.invoke("hello"), chat.invoke("hello", model="tenant")
        assert base.response_metadata["model_name"] == "base" and tuned.response_metadata["model_name"] == "tenant"
        assert base.content != tuned.content  # the adapter changes the output
        assert chat.invoke("hello", model="base").content == base.content
        assert chat._get_ls_params(model="tenant")["ls_model_name"] == "tenant"
        with pytest.raises(InvalidRequestError, match=r"^model: 'nope' is neither the base model"):
            chat.invoke("hello", model="nope")
    finally:
        chat.close()


class Person(BaseModel):
    name: str
    age: int


def test_structured_output_include_raw(demo_runtime: EngineRuntime, demo_dir: Path) -> None:
    script = ScriptedReplies(demo_dir, '{"name":"Ada","age":36}', '{"name":"Ada"}')
    chat = ChatKVLoom(engine=demo_runtime, temperature=0, max_tokens=32, logits_processors=[script])
    structured = chat.with_structured_output(Person, method="json_mode", include_raw=True)
    good = structured.invoke("Who?")
    assert good["parsed"] == Person(name="Ada", age=36) and good["parsing_error"] is None
    assert isinstance(good["raw"], AIMessage) and json.loads(str(good["raw"].content)) == {"name": "Ada", "age": 36}
    bad = structured.invoke("Who?")  # valid JSON (json_mode), but not a Person: reported, not raised
    assert bad["parsed"] is None and "age" in str(bad["parsing_error"])
    with pytest.raises(ValueError, match="method"):
        chat.with_structured_output(Person, method="xml")  # type: ignore[arg-type]


def test_the_completion_llm_batches_streams_and_counts(demo_runtime: EngineRuntime) -> None:
    llm = KVLoom(engine=demo_runtime, temperature=0, max_tokens=5)
    result = llm.generate(["Once upon a time", "The capital of France is"])
    texts = [g[0].text for g in result.generations]
    assert [g[0].generation_info["finish_reason"] for g in result.generations] == ["length", "length"]  # type: ignore[index]
    assert result.llm_output is not None and result.llm_output["token_usage"]["completion_tokens"] == 10
    assert "".join(llm.stream("Once upon a time")) == texts[0]  # same greedy tokens, streamed

    async def both() -> list[str]:
        return await llm.abatch(["Once upon a time", "The capital of France is"])

    assert asyncio.run(both()) == texts

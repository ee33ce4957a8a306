"""Chat and text completions through the official client: the same answer streamed or not,
usage with cached prompt tokens, logprobs, n choices, LoRA adapters picked by ``model``, and
tool calls and results going back through the chat template."""

from __future__ import annotations

import json

import openai
import pytest

from kvloom import AsyncEngine
from tests.integrations.openai_server.conftest import ADAPTER, MODEL, prompt_len, user

pytestmark = pytest.mark.asyncio(loop_scope="package")


async def test_models_lists_the_base_model_and_each_adapter(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL, ADAPTER]
    assert (await client.models.retrieve(ADAPTER)).id == ADAPTER


async def test_chat_streamed_and_not_give_one_answer_with_usage_and_cached_tokens(
    client: openai.AsyncOpenAI, engine: AsyncEngine,
) -> None:
    # Long enough to fill whole KV blocks, so the second request finds them in the prefix cache.
    messages = user("Describe the paged KV cache of an inference engine in three careful sentences, please.")
    done = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    choice = done.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop") and done.object == "chat.completion"
    num_prompt = prompt_len(engine, messages)
    assert done.usage is not None and done.usage.prompt_tokens == num_prompt
    assert done.usage.total_tokens == num_prompt + done.usage.completion_tokens

    stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    *content_chunks, last = chunks
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == choice.message.content
    assert content_chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.usage is None and c.id == last.id for c in content_chunks)
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (num_prompt, done.usage.completion_tokens)
    cached = last.usage.prompt_tokens_details
    assert cached is not None and cached.cached_tokens is not None
    assert 16 <= cached.cached_tokens < num_prompt  # whole blocks of the repeated prompt (block_size 16)


async def test_completions_streamed_and_not_with_logprobs_and_n(client: openai.AsyncOpenAI) -> None:
    done = await client.completions.create(model=MODEL, prompt="The engine batches", max_tokens=5,
                                           temperature=1.0, seed=7, n=2, logprobs=2)
    assert done.object == "text_completion" and [c.index for c in done.choices] == [0, 1]
    for c in done.choices:
        assert c.logprobs is not None and c.logprobs.tokens is not None and c.logprobs.top_logprobs is not None
        assert len(c.logprobs.tokens) == 5 and all(len(top) <= 2 for top in c.logprobs.top_logprobs)
        assert all(lp is not None and lp <= 0 for lp in c.logprobs.token_logprobs or [])
    assert done.usage is not None and done.usage.completion_tokens == 10
    assert done.choices[0].text != done.choices[1].text  # choice i samples with seed + i

    stream = await client.completions.create(model=MODEL, prompt="The engine batches", max_tokens=5,
                                             temperature=1.0, seed=7, n=2, stream=True)
    texts = {0: "", 1: ""}
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {0: done.choices[0].text, 1: done.choices[1].text}


async def test_model_picks_a_lora_adapter(client: openai.AsyncOpenAI) -> None:
    args = dict(prompt=[5, 6, 7, 8, 9], max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    base = await client.completions.create(model=MODEL, **args)  # type: ignore[call-overload]
    tuned = await client.completions.create(model=ADAPTER, **args)  # type: ignore[call-overload]
    again = await client.completions.create(model=MODEL, **args)  # type: ignore[call-overload]
    assert tuned.model == ADAPTER and tuned.choices[0].text != base.choices[0].text
    assert again.choices[0].text == base.choices[0].text


async def test_tool_calls_and_results_go_back_through_the_chat_template(
    client: openai.AsyncOpenAI, engine: AsyncEngine,
) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in"}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"sky": "clear"})},
    ]
    done = await client.chat.completions.create(model=MODEL, messages=messages, tools=tools,  # type: ignore[arg-type]
                                                tool_choice="none", max_tokens=1)
    # What the template must have been given: system for developer, joined text parts, the
    # call's arguments as an object (templates write them with tojson), the tool's result.
    expected = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in\nParis?"},
        {"role": "assistant", "content": "", "tool_calls": [{**call, "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
    ]
    assert engine.tokenizer is not None
    rendered = engine.tokenizer.apply_chat_template(expected, tools=tools, add_generation_prompt=True, tokenize=False)
    assert '<tool_response>\n{"sky": "clear"}' in rendered and '"arguments": {"city": "Paris"}' in rendered
    assert done.usage is not None and done.usage.prompt_tokens == prompt_len(engine, expected, tools)

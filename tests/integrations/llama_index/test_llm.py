"""``KVLoomLLM`` as LlamaIndex uses it: the nine methods on the demo model, per-call settings,
usage in ``raw``, LlamaIndex's token counting, prefix handles, and early exits that abort."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage, LLMMetadata, MessageRole
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from pydantic import ValidationError

from kvloom import AsyncEngine, InvalidRequestError, RequestTimeoutError
from kvloom.integrations.llama_index import KVLoomLLM

MESSAGES = [ChatMessage(role=MessageRole.SYSTEM, content="You are terse."),
            ChatMessage(role=MessageRole.USER, content="Name a colour.")]
EXACT = {"max_tokens": 12, "ignore_eos": True}


def assert_usage(raw: dict[str, Any], completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    usage: dict[str, Any] = raw["usage"]
    assert usage["completion_tokens"] == completion_tokens and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": cached_tokens}
    return usage


def whole_blocks(llm: KVLoomLLM, prompt_tokens: int) -> int:
    """The prompt tokens a repeat of a prompt finds in the prefix cache: those of its whole KV blocks,
    never the last token (it is computed again, for the logits)."""
    block_size = llm.runtime.start().config.cache.block_size
    return block_size * ((prompt_tokens - 1) // block_size)


def counts(raw: dict[str, Any]) -> tuple[int, int]:
    """Prompt and completion tokens (cached tokens differ once automatic prefix caching kicks in)."""
    return raw["usage"]["prompt_tokens"], raw["usage"]["completion_tokens"]


def test_construction_reads_the_config_but_loads_no_weights(demo_dir: Path) -> None:
    llm = KVLoomLLM(demo_dir)
    assert llm.runtime.engine is None  # nothing started, no thread
    assert llm.metadata == LLMMetadata(context_window=2048, num_output=256, is_chat_model=True,
                                       is_function_calling_model=True, model_name=demo_dir.name)
    short = KVLoomLLM(demo_dir, model="demo", max_tokens=64, engine_kwargs={"max_model_len": 512})
    assert (short.metadata.context_window, short.metadata.num_output, short.metadata.model_name) == (512, 64, "demo")
    assert short.runtime.engine is None


def test_bad_settings_fail_at_construction_naming_the_field(demo_dir: Path) -> None:
    with pytest.raises(ValidationError, match="temperature"):
        KVLoomLLM(demo_dir, temperature=-1.0)
    with pytest.raises(ValidationError, match="top_pp"):
        KVLoomLLM(demo_dir, additional_kwargs={"top_pp": 0.5})
    with pytest.raises(ValidationError, match="max_num_seq"):
        KVLoomLLM(demo_dir, engine_kwargs={"max_num_seq": 2})
    with pytest.raises(ValueError, match="not both"):
        KVLoomLLM()
    with pytest.raises(ValueError, match="engine_kwargs"):
        KVLoomLLM(engine=AsyncEngine.from_pretrained(demo_dir), engine_kwargs={"max_num_seqs": 2})


def test_chat_and_stream_chat_agree(llm: KVLoomLLM) -> None:
    # A cache salt of its own: nothing another test ran is in the cache for it.
    salted = {"cache_salt": "test_chat_and_stream_chat_agree", **EXACT}
    done = llm.chat(MESSAGES, **salted)
    assert done.message.role == MessageRole.ASSISTANT and done.message.content
    usage = assert_usage(done.raw, 12, cached_tokens=0)  # the first of its salt: nothing cached
    assert done.raw["finish_reason"] == "length" and done.raw["model"] == llm.metadata.model_name
    assert done.additional_kwargs == {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    streamed = list(llm.stream_chat(MESSAGES, **salted))
    assert "".join(r.delta or "" for r in streamed) == streamed[-1].message.content == done.message.content
    assert [r.message.content for r in streamed] == [
        "".join(r.delta or "" for r in streamed[:i + 1]) for i in range(len(streamed))]  # text so far
    assert all("usage" not in r.raw for r in streamed[:-1]) and counts(streamed[-1].raw) == counts(done.raw)
    # The same prompt again: its whole blocks come from the cache.
    repeat = whole_blocks(llm, usage["prompt_tokens"])
    assert repeat > 0, "the prompt should fill at least one block"
    assert_usage(streamed[-1].raw, 12, cached_tokens=repeat)


@pytest.mark.asyncio
async def test_achat_and_astream_chat_agree_with_chat(llm: KVLoomLLM) -> None:
    done = llm.chat(MESSAGES, **EXACT)
    answer = await llm.achat(MESSAGES, **EXACT)
    assert answer.message.content == done.message.content and counts(answer.raw) == counts(done.raw)
    streamed = [r async for r in await llm.astream_chat(MESSAGES, **EXACT)]
    assert "".join(r.delta or "" for r in streamed) == streamed[-1].message.content == done.message.content
    assert counts(streamed[-1].raw) == counts(done.raw)


@pytest.mark.asyncio
async def test_the_four_completion_methods_agree(llm: KVLoomLLM) -> None:
    done = llm.complete("Once upon a time", **EXACT)
    # Shorter than a KV block: only whole blocks are cached, so never any of it, first call or not.
    assert done.text and assert_usage(done.raw, 12, cached_tokens=0)
    assert whole_blocks(llm, done.raw["usage"]["prompt_tokens"]) == 0
    assert (await llm.acomplete("Once upon a time", **EXACT)).text == done.text
    streamed = list(llm.stream_complete("Once upon a time", **EXACT))
    assert "".join(r.delta or "" for r in streamed) == streamed[-1].text == done.text
    assert counts(streamed[-1].raw) == counts(done.raw)
    astreamed = [r async for r in await llm.astream_complete("Once upon a time", **EXACT)]
    assert astreamed[-1].text == done.text and counts(astreamed[-1].raw) == counts(done.raw)


def test_complete_is_a_text_completion_of_completion_to_prompt(llm: KVLoomLLM) -> None:
    engine = llm.runtime.start()
    wrapped = KVLoomLLM(engine=engine, temperature=0.0, completion_to_prompt=lambda p: f"Q: {p}\nA:")
    out = wrapped.complete("Why?", **EXACT)
    assert counts(out.raw) == counts(llm.complete("Q: Why?\nA:", formatted=True, **EXACT).raw)
    assert out.text == llm.complete("Q: Why?\nA:", **EXACT).text  # llm's completion_to_prompt is the identity
    assert wrapped.complete("Q: Why?\nA:", formatted=True, **EXACT).text == out.text  # formatted: as given


def test_per_call_settings_reach_the_request(llm: KVLoomLLM, sibling: KVLoomLLM) -> None:
    text = llm.chat(MESSAGES, **EXACT).message.content or ""
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = llm.chat(MESSAGES, stop=[stop], **EXACT)
    assert cut.message.content == text[:text.index(stop)] and cut.raw["finish_reason"] == "stop"
    assert llm.chat(MESSAGES, max_tokens=3, ignore_eos=True).raw["usage"]["completion_tokens"] == 3
    with pytest.raises(ValidationError, match="temprature"):
        llm.chat(MESSAGES, temprature=0.0)
    with pytest.raises(ValueError, match="n: "):
        llm.chat(MESSAGES, n=2)
    with pytest.raises(InvalidRequestError, match="adapter"):
        llm.chat(MESSAGES, adapter="no-such-adapter")
    sibling.adapter = "no-such-adapter"  # the LLM's default adapter goes to every call
    with pytest.raises(InvalidRequestError, match="adapter"):
        sibling.chat(MESSAGES)
    with pytest.raises(RequestTimeoutError):
        llm.chat(MESSAGES, timeout=0.001, max_tokens=1500, ignore_eos=True)


def test_a_prefix_handle_is_found_in_the_cache(llm: KVLoomLLM) -> None:
    system = ChatMessage(role=MessageRole.SYSTEM, content="You answer questions about colours. " * 6)
    handle = llm.cache_prefix([system])
    try:
        assert handle.num_cached_tokens >= 16
        out = llm.chat([system, ChatMessage(role=MessageRole.USER, content="Red?")], prefix=handle, max_tokens=2)
        assert out.raw["usage"]["prompt_tokens_details"]["cached_tokens"] == handle.num_cached_tokens
    finally:
        llm.release_prefix(handle)
    assert not llm.runtime.run(_live_prefixes)


async def _live_prefixes(engine: AsyncEngine) -> list[Any]:
    return engine.prefixes()


def test_token_counting_handler_counts_the_engines_tokens(llm: KVLoomLLM) -> None:
    # A fallback estimate (used only when raw["usage"] is missing) would count 1 per text.
    counter = TokenCountingHandler(tokenizer=lambda text: [0])
    counted = KVLoomLLM(engine=llm.runtime.start(), temperature=0.0, callback_manager=CallbackManager([counter]))
    chat = counted.chat(MESSAGES, **EXACT)
    streamed = list(counted.stream_chat(MESSAGES, max_tokens=5, ignore_eos=True))
    completion = counted.complete("Once upon a time", max_tokens=7, ignore_eos=True)
    prompts = [chat.raw["usage"]["prompt_tokens"], streamed[-1].raw["usage"]["prompt_tokens"],
               completion.raw["usage"]["prompt_tokens"]]
    assert [e.prompt_token_count for e in counter.llm_token_counts] == prompts and min(prompts) > 1
    assert [e.completion_token_count for e in counter.llm_token_counts] == [12, 5, 7]


def test_leaving_a_stream_early_aborts_the_request(llm: KVLoomLLM) -> None:
    stream = llm.stream_chat(MESSAGES, max_tokens=1500, ignore_eos=True)
    first = next(stream)
    assert first.raw["finish_reason"] is None
    stream.close()
    llm.runtime.run(_settled_and_idle)  # its KV blocks came back


async def _settled_and_idle(engine: AsyncEngine) -> None:
    # Unaborted, 1,500 tokens would take well over 5 s on any machine this runs on (~10 ms a token).
    await engine.wait_idle(timeout=5.0)
    engine.assert_idle()

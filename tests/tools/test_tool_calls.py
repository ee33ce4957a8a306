"""Constrained tool calls on tiny random checkpoints of two families: every sampled call names an
allowed tool and its arguments validate against that tool's schema."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest

from kvloom import LLM, AsyncEngine, InvalidRequestError, SamplingParams
from tests.engine.helpers import assert_settles_idle

TOOLS = [
    {"type": "function", "function": {
        "name": "book_trip", "description": "Book a trip.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "travellers": {"type": "array", "items": {"type": "object", "properties": {
                    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                    "required": ["name", "age"]}, "minItems": 1, "maxItems": 2},
                "class": {"enum": ["economy", "business"]},
                "flexible": {"type": "boolean"},
            },
            "required": ["city", "travellers", "class"],
        }}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 10},
                                                        "limit": {"type": "integer", "minimum": 1, "maximum": 5}},
                       "required": ["q"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "Book me a trip to Paris."}]
FAMILIES = {"llama": dict(arch="llama", chat_template="llama3"), "hermes": dict(arch="qwen2", chat_template="hermes")}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request: pytest.FixtureRequest, checkpoint_factory: Callable[..., Path]) -> Path:
    return checkpoint_factory(max_position_embeddings=2048, **FAMILIES[request.param])


def sampled(n: int) -> list[SamplingParams]:
    return [SamplingParams(temperature=1.0, seed=seed, max_tokens=400) for seed in range(n)]


def assert_valid_calls(completions: list, allowed: set[str], single: bool) -> int:  # type: ignore[type-arg]
    num_calls = 0
    for c in completions:
        # Parallel calls may run into max_tokens (a random model rarely stops): the complete
        # calls before the cut still count, and must validate like the others.
        assert c.finish_reason == "tool_calls" or (c.finish_reason == "length" and not single), c.finish_reason
        assert c.tool_calls and (len(c.tool_calls) == 1 or not single)
        complete = c.tool_calls if c.finish_reason == "tool_calls" else c.tool_calls[:-1]  # the last may be cut
        for call in complete:
            assert call.name in allowed
            jsonschema.validate(call.parsed, SCHEMAS[call.name])
            num_calls += 1
        assert len({call.id for call in c.tool_calls}) == len(c.tool_calls)
    return num_calls


def test_required_calls_always_validate(family_dir: Path) -> None:
    llm = LLM(family_dir)
    out = llm.chat([USER] * 50, sampled(50), tools=TOOLS, tool_choice="required")
    num_calls = assert_valid_calls(out, {"book_trip", "search"}, single=False)
    assert num_calls >= 50
    assert {call.name for c in out for call in c.tool_calls} == {"book_trip", "search"}, "both tools get chosen"
    assert max(len(c.tool_calls) for c in out) > 1, "parallel calls when allowed"
    llm.assert_idle()
    llm.close()


def test_a_named_tool_and_no_parallel_calls(family_dir: Path) -> None:
    llm = LLM(family_dir)
    named = {"type": "function", "function": {"name": "book_trip"}}
    out = llm.chat([USER] * 50, sampled(50), tools=TOOLS, tool_choice=named, parallel_tool_calls=False)
    assert assert_valid_calls(out, {"book_trip"}, single=True) == 50
    llm.close()


def test_auto_gives_text_or_valid_calls(family_dir: Path) -> None:
    llm = LLM(family_dir)
    out = llm.chat([USER] * 10, [SamplingParams(temperature=1.0, seed=s, max_tokens=64) for s in range(10)],
                   tools=TOOLS)
    for c in out:
        if c.tool_calls:
            assert_valid_calls([c], {"book_trip", "search"}, single=False)
        else:
            assert c.finish_reason in ("stop", "length")
    llm.close()


def test_bad_tool_requests_fail_at_submit_naming_the_field(family_dir: Path) -> None:
    llm = LLM(family_dir)
    with pytest.raises(InvalidRequestError, match=r"tools\[0\]\.function\.name"):
        llm.chat(USER, tools=[{"type": "function", "function": {"parameters": {}}}])
    with pytest.raises(InvalidRequestError, match="tool_choice: no tool named 'nope'"):
        llm.chat(USER, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(InvalidRequestError, match="response_format"):
        llm.chat(USER, SamplingParams(response_format={"choice": ["a"]}), tools=TOOLS)
    with pytest.raises(InvalidRequestError, match="outlines"):
        llm.chat(USER, SamplingParams(grammar_backend="outlines"), tools=TOOLS, tool_choice="required")
    llm.assert_idle()
    llm.close()


@pytest.mark.anyio
async def test_async_engine_takes_tools_and_refuses_them_on_a_prompt(family_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(family_dir) as engine:
        with pytest.raises(InvalidRequestError, match="tools: need chat `messages`"):
            engine.stream("hello", tools=TOOLS)
        out = await engine.generate(messages=USER, params=sampled(1)[0], tools=TOOLS, tool_choice="required")
        assert_valid_calls([out], {"book_trip", "search"}, single=False)
        engine.assert_idle()


@pytest.mark.anyio
async def test_streamed_deltas_add_up_to_the_completion_without_markup(family_dir: Path) -> None:
    from kvloom.engine.streams import merge_tool_deltas

    async with AsyncEngine.from_pretrained(family_dir) as engine:
        for seed in range(4):
            params = SamplingParams(temperature=1.0, seed=seed, max_tokens=400)
            done = await engine.generate(messages=USER, params=params, tools=TOOLS, tool_choice="required")
            texts, deltas, reasons = [], [], []
            async for chunk in engine.stream(messages=USER, params=params, tools=TOOLS, tool_choice="required"):
                texts.append(chunk.text)
                deltas = merge_tool_deltas(deltas, chunk.tool_calls or [])
                reasons.append(chunk.finish_reason)
            assert "".join(texts) == done.text
            assert not any("<tool_call>" in t or '{"name"' in t for t in texts), texts
            assert reasons[-1] == done.finish_reason
            heads = [d for d in deltas if d.id is not None]
            assert [d.name for d in heads] == [c.name for c in done.tool_calls]
            assert len({d.id for d in heads}) == len(heads)
            arguments = ["".join(d.arguments for d in deltas if d.index == i) for i in range(len(heads))]
            assert arguments == [c.arguments for c in done.tool_calls]
        engine.assert_idle()


def test_auto_once_a_call_starts_the_rest_is_constrained(family_dir: Path) -> None:
    """A random model in ``auto`` mode rarely opens a call by itself, so a scripted processor
    writes the family's opening (``<tool_call>`` or ``{"name"``); the grammar does the rest."""
    import torch

    from kvloom.structured import LogitsProcessor

    llm = LLM(family_dir)
    opening = "<tool_call>" if llm.inputs.tool_call_format == "hermes" else '{"name": '  # the grammar's triggers
    forced = llm.tokenizer.encode(opening)

    class WriteOpening(LogitsProcessor):
        def __init__(self) -> None:
            self.step = 0

        def process_logits(self, logits: torch.Tensor) -> None:
            if self.step < len(forced):
                keep = logits[forced[self.step]].clone()
                logits.fill_(float("-inf"))
                logits[forced[self.step]] = keep

        def accept_token(self, token_id: int) -> bool:
            self.step += 1
            return True

    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=400, logits_processors=[WriteOpening])
              for s in range(20)]
    out = llm.chat([USER] * 20, params, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False)
    assert [c.text for c in out] == [""] * 20, "the opening is markup, not text; one call, then the end"
    assert assert_valid_calls(out, {"book_trip", "search"}, single=True) == 20
    llm.close()


@pytest.mark.anyio
async def test_a_three_turn_agent_loop_reuses_its_prefix(family_dir: Path) -> None:
    """Call, tool result, answer, through AsyncEngine with a handle of the system prompt and
    tools: each turn finds the earlier turns' KV in the cache."""
    await run_agent_loop(family_dir)


@pytest.mark.anyio
async def test_the_agent_loop_on_the_demo_model(checkpoint_factory: Callable[..., Path]) -> None:
    """The same loop on the demo model (``python -m kvloom demo``'s checkpoint, built from its spec)."""
    from kvloom.demo import DEMO_MODEL

    await run_agent_loop(checkpoint_factory(**DEMO_MODEL.build_kwargs))


async def run_agent_loop(model_dir: Path) -> None:
    system = [{"role": "system", "content": "You are a travel agent. Use the tools."}]
    async with AsyncEngine.from_pretrained(model_dir) as engine:
        handle = await engine.cache_prefix(messages=system, tools=TOOLS)
        convo: list[dict[str, object]] = [*USER]
        call = await engine.generate(messages=convo, prefix=handle, tools=TOOLS, tool_choice="required",
                                     parallel_tool_calls=False, params=sampled(1)[0])
        assert_valid_calls([call], {"book_trip", "search"}, single=True)
        convo += [{"role": "assistant", "content": call.text, "tool_calls": [c.to_openai() for c in call.tool_calls]},
                  {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": '{"booked": true}'}]
        answer = await engine.generate(messages=convo, prefix=handle, tools=TOOLS, tool_choice="none",
                                       params=SamplingParams(temperature=0.0, max_tokens=8))
        assert not answer.tool_calls
        convo += [{"role": "assistant", "content": answer.text}, {"role": "user", "content": "Thanks!"}]
        last = await engine.generate(messages=convo, prefix=handle, tools=TOOLS,
                                     params=SamplingParams(temperature=0.0, max_tokens=4))
        cached = [call.usage.cached_tokens, answer.usage.cached_tokens, last.usage.cached_tokens]
        assert handle.num_cached_tokens <= cached[0] < cached[1] < cached[2], cached
        assert handle.hits == 3
        handle.release()
        await assert_settles_idle(engine)


@pytest.mark.anyio
async def test_a_call_cut_by_max_tokens_is_marked_incomplete_and_says_so(family_dir: Path) -> None:
    """The same seeded call twice: whole, then with ``max_tokens`` ending it inside its arguments.
    The cut call is still reported (as OpenAI does with ``finish_reason="length"``), marked
    ``incomplete`` in the completion and in the stream, and ``parsed`` names the cause."""
    from kvloom.engine.streams import merge_tool_deltas
    from kvloom.outputs import IncompleteToolCallError, ToolCallDelta

    named = {"type": "function", "function": {"name": "book_trip"}}
    request = dict(messages=USER, tools=TOOLS, tool_choice=named, parallel_tool_calls=False)
    async with AsyncEngine.from_pretrained(family_dir) as engine:
        whole = await engine.generate(params=SamplingParams(temperature=1.0, seed=0, max_tokens=400), **request)
        assert whole.finish_reason == "tool_calls" and not whole.tool_calls[0].incomplete
        # The first token count whose text reaches into the arguments (past the call's name).
        decode = engine.tokenizer.decode  # type: ignore[union-attr]
        inside = next(k for k in range(1, len(whole.token_ids)) if '"city"' in decode(whole.token_ids[:k]))
        cut_params = SamplingParams(temperature=1.0, seed=0, max_tokens=inside)
        cut = await engine.generate(params=cut_params, **request)
        assert cut.finish_reason == "length" and [c.name for c in cut.tool_calls] == ["book_trip"]
        call = cut.tool_calls[0]
        assert call.incomplete and whole.tool_calls[0].arguments.startswith(call.arguments)
        with pytest.raises(IncompleteToolCallError, match=r"'book_trip'.*cut by max_tokens.*raise max_tokens"):
            _ = call.parsed
        chunks = [chunk async for chunk in engine.stream(params=cut_params, **request)]
        deltas: list[ToolCallDelta] = []
        for chunk in chunks:
            deltas = merge_tool_deltas(deltas, chunk.tool_calls or [])
        assert chunks[-1].finish_reason == "length" and any(d.incomplete for d in chunks[-1].tool_calls or [])
        assert "".join(d.arguments for d in deltas) == call.arguments and deltas[-1].incomplete
        engine.assert_idle()

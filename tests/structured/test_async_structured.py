"""Constrained decoding through AsyncEngine: failures stay with their request, compiles
never stall the batch, grammars work through prefix handles. asyncio and trio."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import jsonschema
import pytest

from kvloom import AsyncEngine, SamplingParams
from kvloom.errors import GrammarError, InvalidRequestError
from tests.engine.helpers import assert_settles_idle
from tests.structured.schemas import SCHEMAS

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def json_params(name: str, seed: int, backend: str = "xgrammar") -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=160, response_format=SCHEMAS[name],
                          grammar_backend=backend)  # type: ignore[arg-type]


async def test_a_bad_schema_fails_only_its_own_request(llama_dir: Path) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    async with AsyncEngine.from_pretrained(llama_dir, max_model_len=512) as engine:
        reference = (await engine.generate("hello world", greedy)).choices[0].token_ids
        results: dict[str, object] = {}

        async def run(key: str, prompt: str, params: SamplingParams) -> None:
            try:
                results[key] = await engine.generate(prompt, params)
            except GrammarError as exc:
                results[key] = exc

        bad_regex = SamplingParams(response_format={"type": "regex", "regex": "[unclosed"})
        bad_schema = SamplingParams(response_format={"type": "object", "properties": {"a": {"type": "nonsense"}}},
                                    grammar_backend="outlines")
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "plain", "hello world", greedy)
            tg.start_soon(run, "bad_regex", "x", bad_regex)
            tg.start_soon(run, "json", "x", json_params("nested_object", 1))
            tg.start_soon(run, "bad_schema", "x", bad_schema)
        assert isinstance(results["bad_regex"], GrammarError) and "response_format" in str(results["bad_regex"])
        assert isinstance(results["bad_schema"], GrammarError) and "response_format" in str(results["bad_schema"])
        plain = results["plain"]
        assert not isinstance(plain, Exception) and plain.choices[0].token_ids == reference  # type: ignore[union-attr]
        good = results["json"]
        assert not isinstance(good, Exception)
        if good.choices[0].finish_reason == "stop":  # type: ignore[union-attr]
            jsonschema.validate(json.loads(good.text), SCHEMAS["nested_object"])  # type: ignore[union-attr]
        # EBNF on outlines is known to fail without compiling: refused at submit.
        with pytest.raises(InvalidRequestError, match="xgrammar"):
            engine.stream("x", SamplingParams(response_format={"type": "grammar", "grammar": 'root ::= "a"'},
                                              grammar_backend="outlines"))
        assert engine.stats().healthy
        engine.assert_idle()


async def test_a_compile_past_the_timeout_fails_that_request(llama_dir: Path) -> None:
    # outlines compiles in a fresh process pool: its first compile takes far longer than 1 ms.
    async with AsyncEngine.from_pretrained(llama_dir, max_model_len=512, grammar_compile_timeout=0.001) as engine:
        with pytest.raises(GrammarError, match="grammar_compile_timeout"):
            await engine.generate("x", json_params("refs", 0, backend="outlines"))
        out = await engine.generate("x", SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
        assert len(out.choices[0].token_ids) == 5


async def test_streams_keep_flowing_while_a_grammar_compiles(llama_dir: Path) -> None:
    """A stream already decoding gets tokens while a new request waits for its grammar."""
    async with AsyncEngine.from_pretrained(llama_dir, max_model_len=512) as engine:
        long = engine.stream("hello", SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
        first = await long.__anext__()
        assert first.token_ids
        constrained = await engine.generate("x", json_params("pydantic_person", 3, backend="outlines"))
        count = len(first.token_ids)
        async for chunk in long:
            count += len(chunk.token_ids)
        assert count == 200
        if constrained.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(constrained.text), SCHEMAS["pydantic_person"])


async def test_grammar_through_a_prefix_handle(llama_dir: Path) -> None:
    system = "You are a careful assistant that answers in JSON. " * 4
    async with AsyncEngine.from_pretrained(llama_dir, max_model_len=512) as engine:
        handle = await engine.cache_prefix(system)
        for seed in range(3):
            out = await engine.generate(" Answer:", json_params("enums", seed), prefix=handle)
            assert out.usage.cached_tokens == handle.num_cached_tokens > 0
            assert out.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(out.text), SCHEMAS["enums"])
        handle.release()


async def test_cancelling_constrained_streams_frees_everything(llama_dir: Path) -> None:
    """A storm of constrained streams on both backends, some cancelled while their grammar is
    still compiling (a fresh regex each), some mid-decode: the rest validate, every block is
    free, and no request is left waiting for a grammar."""
    import random
    import re

    rng = random.Random(4)
    completed: dict[int, object] = {}
    expected: set[int] = set()
    async with AsyncEngine.from_pretrained(llama_dir, max_model_len=512, max_num_seqs=16) as engine:

        def params(i: int) -> SamplingParams:
            backend = "xgrammar" if i % 2 else "outlines"
            if i % 3 == 0:  # a regex no other request shares: it must compile, so it can be cancelled waiting
                return SamplingParams(temperature=1.0, seed=i, max_tokens=40, grammar_backend=backend,
                                      response_format={"regex": f"id{i}-[a-z]{{2,5}}"})
            if i % 3 == 1:
                return json_params("enums", i, backend)
            return SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)

        async def run(i: int, cancel_after: int | None) -> None:
            received = 0
            text = ""
            with anyio.CancelScope() as scope:
                if cancel_after == 0:
                    scope.cancel()  # cancelled before the first chunk: likely while compiling
                async for chunk in engine.stream("go", params(i)):
                    received += 1
                    text += chunk.text
                    if cancel_after is not None and received >= cancel_after:
                        scope.cancel()
                        await anyio.sleep(0)
                completed[i] = (text, chunk.finish_reason)

        async with anyio.create_task_group() as tg:
            for i in range(60):
                cancel_after = rng.choice([None, None, 0, 1, 3])
                if cancel_after is None:
                    expected.add(i)
                tg.start_soon(run, i, cancel_after)
        assert set(completed) == expected
        for i in expected:
            text, reason = completed[i]  # type: ignore[misc]
            if i % 3 == 0:
                assert reason == "stop" and re.fullmatch(f"id{i}-[a-z]{{2,5}}", text), text
            elif i % 3 == 1 and reason == "stop":
                jsonschema.validate(json.loads(text), SCHEMAS["enums"])
        await assert_settles_idle(engine)  # the last aborts land at the next step boundary
        assert engine.stats().num_waiting == 0  # none left waiting for a grammar
        assert engine.stats().healthy

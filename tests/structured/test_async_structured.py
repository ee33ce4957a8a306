"""Constrained decoding through AsyncEngine: failures stay with their request, compiles
never stall the batch, grammars work through prefix handles. asyncio and trio."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import anyio
import pytest

from kvloom import AsyncEngine, SamplingParams
from kvloom.errors import GrammarError, InvalidRequestError
from kvloom.structured.compiler import GrammarCompiler
from tests.engine.helpers import assert_settles_idle
from tests.structured.grammar_helpers import assert_valid, assert_valid_or_prefix, assert_valid_prefix
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
        assert_valid_or_prefix(good.text, good.finish_reason, SCHEMAS["nested_object"])  # type: ignore[union-attr]
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


def hold_compiles(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Future[Any], Future[Any]]]:
    """Every grammar the engine asks for still compiles for real (xgrammar's threads, outlines'
    processes), but the engine gets a stand-in future that completes only when the test
    completes it: (the real compile, the engine's future) per request, in submission order."""
    held: list[tuple[Future[Any], Future[Any]]] = []
    real_submit = GrammarCompiler.submit

    def submit(self: GrammarCompiler, spec: Any, backend: str | None = None) -> Future[Any]:
        stand_in: Future[Any] = Future()
        held.append((real_submit(self, spec, backend), stand_in))
        return stand_in

    monkeypatch.setattr(GrammarCompiler, "submit", submit)
    return held


@pytest.mark.parametrize("backend", ["xgrammar", "outlines"])
async def test_streams_keep_flowing_while_a_grammar_compiles(
    llama_dir: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two streams already decoding get tokens while a new request waits for its grammar: the
    compile is held until both have received 10 more tokens, so an engine that waited for it
    (in the step, or on the event loop) would never deliver them and the test would time out."""
    held = hold_compiles(monkeypatch)
    unconstrained = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    async with AsyncEngine.from_pretrained(llama_dir, max_model_len=512) as engine:
        streams = [engine.stream(prompt, unconstrained) for prompt in ("hello", "once upon a time")]
        counts = [len((await stream.__anext__()).token_ids) for stream in streams]
        assert all(counts)
        constrained: dict[str, Any] = {}

        async def run_constrained() -> None:
            constrained["out"] = await engine.generate("x", json_params("pydantic_person", 3, backend))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_constrained)
                while not held:  # the request was submitted: its grammar is now compiling, held
                    await anyio.sleep(0)
                before = list(counts)
                # 30 s only bounds a stuck engine: 10 steps take well under a second, even on a loaded machine.
                with anyio.move_on_after(30):
                    for i, stream in enumerate(streams):
                        while counts[i] < before[i] + 10:
                            counts[i] += len((await stream.__anext__()).token_ids)
                progress = [c - b for c, b in zip(counts, before, strict=True)]
                assert min(progress) >= 10, f"tokens per stream during a held compile: {progress}"
                assert "out" not in constrained, "the constrained request ran before its grammar compiled"
                compiled, stand_in = held[0]
                stand_in.set_result(await anyio.to_thread.run_sync(compiled.result, 120))
        finally:  # never leave the engine waiting on a held compile (it would time out, not hang)
            for _, stand_in in held:
                if not stand_in.done():
                    stand_in.set_exception(RuntimeError("the test ended before releasing this compile"))
        out = constrained["out"]
        assert_valid_or_prefix(out.text, out.finish_reason, SCHEMAS["pydantic_person"])
        for i, stream in enumerate(streams):
            async for chunk in stream:
                counts[i] += len(chunk.token_ids)
        assert counts == [200, 200]
        await assert_settles_idle(engine)


async def test_a_stream_cancelled_while_its_grammar_compiles_leaves_nothing_behind(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request waits for its grammar (counted as waiting), its stream is cancelled: it
    leaves the engine while the compile is still running, and never runs once it compiles."""
    held = hold_compiles(monkeypatch)
    async with AsyncEngine.from_pretrained(llama_dir, max_model_len=512) as engine:
        params = SamplingParams(temperature=1.0, seed=0, max_tokens=200, ignore_eos=True,
                                response_format={"regex": "[a-z ]{150,}"})
        with anyio.CancelScope() as scope:
            async def consume() -> None:
                async for _ in engine.stream("x", params):
                    raise AssertionError("a chunk arrived before the grammar compiled")

            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                with anyio.fail_after(30):  # handed over to the engine thread, waiting for its grammar
                    while engine.stats().num_waiting != 1:
                        await anyio.sleep(0.005)
                scope.cancel()
        await assert_settles_idle(engine)  # gone while its compile is still held
        assert engine.stats().num_waiting == 0  # none left waiting for a grammar
        compiled, stand_in = held[0]
        stand_in.set_result(await anyio.to_thread.run_sync(compiled.result, 120))
        # A request that runs after the release spans steps past this 2-token one: it would be running.
        await engine.generate("y", SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        stats = engine.stats()
        assert (stats.num_running, stats.num_waiting) == (0, 0)
        engine.assert_idle()


async def test_grammar_through_a_prefix_handle(llama_dir: Path) -> None:
    system = "You are a careful assistant that answers in JSON. " * 4
    async with AsyncEngine.from_pretrained(llama_dir, max_model_len=512) as engine:
        handle = await engine.cache_prefix(system)
        for seed in range(3):
            out = await engine.generate(" Answer:", json_params("enums", seed), prefix=handle)
            assert out.usage.cached_tokens == handle.num_cached_tokens > 0
            assert out.choices[0].finish_reason == "stop"
            assert_valid(out.text, SCHEMAS["enums"])
        handle.release()


async def test_cancelling_constrained_streams_frees_everything(llama_dir: Path) -> None:
    """A storm of constrained streams on both backends, some cancelled while their grammar is
    still compiling (a fresh regex each), some mid-decode: the rest validate, what the cancelled
    ones received is a prefix of a valid output, and every block is free."""
    import random

    rng = random.Random(4)
    completed: dict[int, tuple[str, str | None]] = {}
    partial: dict[int, str] = {}
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
                        partial[i] = text
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
        assert any(i % 3 != 2 for i in partial), "no constrained stream was cancelled mid-decode"
        for i in expected:
            text, reason = completed[i]
            fmt = params(i).response_format
            if i % 3 == 0:
                assert reason == "stop", text
            if fmt is not None:
                assert_valid_or_prefix(text, reason, fmt)
        for i, text in partial.items():  # cancelled after 1 or 3 chunks: the start of a valid output
            fmt = params(i).response_format
            if fmt is not None:
                assert_valid_prefix(text, fmt)
        await assert_settles_idle(engine)  # the last aborts land at the next step boundary
        assert engine.stats().num_waiting == 0  # none left waiting for a grammar
        assert engine.stats().healthy

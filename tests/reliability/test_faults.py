"""Reliability, item 4: faults injected at one point each (forward, grammar matcher, adapter load,
user logits processor, tokenizer, detokenizer).

Only the affected requests fail, with a clear error, and the engine keeps serving; a failed
forward (device state no longer trusted) marks the engine dead: streams in flight fail with
``EngineError`` and new requests raise ``EngineDeadError`` at once, never hang. A new engine
then starts cleanly in the same process, and ``aclose()`` gives its memory back.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import torch

from kvloom import AsyncEngine, SamplingParams
from kvloom.engine.detokenizer import IncrementalDetokenizer
from kvloom.errors import AdapterError, EngineClosedError, EngineDeadError, EngineError, InvalidRequestError
from kvloom.lora.synthetic import write_random_adapter
from kvloom.runner.model_runner import ModelRunner
from kvloom.structured.logits_processor import LogitsProcessor
from kvloom.structured.xgrammar_backend import XGrammarProcessor
from tests.engine.helpers import assert_settles_idle, greedy, tokens
from tests.fakes import STRESS

LIMIT = 30.0  # seconds any one check may take: a hang fails, it never blocks the suite
POISON = [7, 7, 7, 7, 7, 7, 7, 7, 7]  # a prompt no other request here uses


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def collect(engine: AsyncEngine, prompt: Any, params: SamplingParams, **kw: Any) -> tuple[str, Any]:
    """("ok", completion finish reason) or ("error", the exception) for one stream."""
    reason = None
    try:
        async for chunk in engine.stream(prompt, params, **kw):
            reason = chunk.finish_reason or reason
    except Exception as exc:
        return "error", exc
    return "ok", reason


async def run_all(engine: AsyncEngine, jobs: list[tuple[Any, SamplingParams]]) -> list[tuple[str, Any]]:
    results: list[tuple[str, Any]] = [("pending", None)] * len(jobs)

    async def one(i: int, prompt: Any, params: SamplingParams) -> None:
        results[i] = await collect(engine, prompt, params)

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            for i, (prompt, params) in enumerate(jobs):
                tg.start_soon(one, i, prompt, params)
    return results


async def still_serves(engine: AsyncEngine) -> None:
    with anyio.fail_after(LIMIT):
        out = await engine.generate(tokens(5, 99), greedy(4))
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    await assert_settles_idle(engine)
    assert engine.stats().healthy


# ---- (a) the forward --------------------------------------------------------------------------
@pytest.mark.anyio
async def test_a_failed_forward_fails_in_flight_requests_and_the_engine_fails_fast(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = ModelRunner._forward
    calls = {"n": 0}

    def forward(self: ModelRunner, inputs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected: device fault in the forward")
        return real(self, inputs)

    monkeypatch.setattr(ModelRunner, "_forward", forward)
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        results = await run_all(engine, [(tokens(6, i), greedy(50)) for i in range(6)])
        assert [kind for kind, _ in results] == ["error"] * 6
        for _, exc in results:
            assert type(exc) is EngineError and "injected: device fault" in str(exc)
            assert isinstance(exc.__cause__, RuntimeError)
        assert not engine.stats().healthy
        with anyio.fail_after(1.0):  # fails fast: at submit, nothing queued
            for call in (lambda: engine.stream([1, 2, 3], greedy(2)), lambda: engine.generate([1, 2, 3], greedy(2))):
                with pytest.raises(EngineDeadError, match="injected: device fault"):
                    result = call()
                    if not hasattr(result, "__aiter__"):
                        await result
            with pytest.raises(EngineDeadError):
                await engine.cache_prefix(tokens(32, 1))
    monkeypatch.undo()
    async with AsyncEngine.from_pretrained(llama_dir) as fresh:  # the same process starts a clean engine
        await still_serves(fresh)


# ---- (b) a grammar matcher ------------------------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize("method", ["fill_bitmask", "accept_token"])
async def test_a_failing_grammar_matcher_ends_only_its_request(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch, method: str,
) -> None:
    real = getattr(XGrammarProcessor, method)
    poisoned: list[int] = []

    def flaky(self: XGrammarProcessor, *args: Any) -> Any:
        if not poisoned:
            poisoned.append(id(self))  # the first matcher to run is the faulty one
        if id(self) in poisoned:
            raise RuntimeError(f"injected: {method} failed")
        return real(self, *args)

    monkeypatch.setattr(XGrammarProcessor, method, flaky)
    fmt = SamplingParams(temperature=0.0, max_tokens=12, response_format={"choice": ["alpha", "beta"]})
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        jobs = [(tokens(5, i), fmt) for i in range(4)] + [(tokens(5, 10 + i), greedy(6)) for i in range(3)]
        results = await run_all(engine, jobs)
        assert results.count(("ok", "error")) == 1, results
        assert all(kind == "ok" for kind, _ in results), results
        assert [r for r in results[4:]] == [("ok", "length")] * 3
        assert sum(r == ("ok", "stop") for r in results[:4]) == 3, results
        await still_serves(engine)


# ---- (c) an adapter load -------------------------------------------------------------------------
@pytest.mark.anyio
async def test_a_corrupt_adapter_fails_its_load_and_the_engine_keeps_serving(llama_dir: Path, tmp_path: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir, max_loras=2, max_lora_rank=16) as engine:
        good = write_random_adapter(tmp_path / "good", engine.core.model_config, r=8, seed=1)
        bad = write_random_adapter(tmp_path / "bad", engine.core.model_config, r=8, seed=2)
        weights = bad / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        await engine.load_adapter("good", good)
        with anyio.fail_after(LIMIT):
            running = [(tokens(5, i), greedy(8)) for i in range(3)]
            async with anyio.create_task_group() as tg:
                results: list[tuple[str, Any]] = []

                async def go(prompt: Any, params: SamplingParams) -> None:
                    results.append(await collect(engine, prompt, params, adapter="good"))

                for prompt, params in running:
                    tg.start_soon(go, prompt, params)
                with pytest.raises(AdapterError, match="safetensors"):
                    await engine.load_adapter("bad", bad)
        assert results == [("ok", "length")] * 3
        assert [a.name for a in engine.adapters()] == ["good"]
        with pytest.raises(InvalidRequestError, match="no adapter named 'bad'"):
            engine.stream([5, 6, 7], greedy(2), adapter="bad")
        await still_serves(engine)


# ---- (d) a user logits processor ----------------------------------------------------------------
class Exploding(LogitsProcessor):
    def __init__(self) -> None:
        self.calls = 0

    def process_logits(self, logits: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 3:
            raise ValueError("injected: user processor bug")


def exploding_factory() -> LogitsProcessor:
    raise RuntimeError("injected: factory bug")


@pytest.mark.anyio
async def test_a_raising_user_logits_processor_ends_only_its_request(llama_dir: Path) -> None:
    bad_run = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logits_processors=[Exploding])
    bad_make = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logits_processors=[exploding_factory])
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        jobs = [(tokens(5, 0), bad_run), (tokens(5, 1), bad_make)] + [(tokens(5, 2 + i), greedy(8)) for i in range(4)]
        results = await run_all(engine, jobs)
        assert results[0] == ("ok", "error")
        kind, exc = results[1]
        assert kind == "error" and isinstance(exc, InvalidRequestError) and "injected: factory bug" in str(exc)
        assert results[2:] == [("ok", "length")] * 4
        await still_serves(engine)


# ---- (e) the tokenizer ----------------------------------------------------------------------------
@pytest.mark.anyio
async def test_a_raising_tokenizer_fails_only_that_submit(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        tok = engine.tokenizer
        real = type(tok).encode

        def encode(self: Any, text: str, *args: Any, **kw: Any) -> Any:
            if "POISON" in text:
                raise RuntimeError("injected: tokenizer failure")
            return real(self, text, *args, **kw)

        monkeypatch.setattr(type(tok), "encode", encode)
        with anyio.fail_after(LIMIT):
            ok = [engine.stream(f"hello world {i}", greedy(4)) for i in range(3)]
            with pytest.raises(RuntimeError, match="injected: tokenizer failure"):  # short prompt: at submit
                engine.stream("POISON short", greedy(4), request_id="short")
            long = engine.stream("POISON " + "x " * 5000, greedy(4), request_id="long")  # tokenized off the loop
            with pytest.raises(RuntimeError, match="injected: tokenizer failure"):
                async for _ in long:
                    pass
            for stream in ok:
                chunks = [c async for c in stream]
                assert chunks[-1].finish_reason == "length"
        # the ids were released: they can be used again
        await engine.generate("fine now", greedy(2), request_id="short")
        await engine.generate("fine now", greedy(2), request_id="long")
        await still_serves(engine)


# ---- (f) the detokenizer --------------------------------------------------------------------------
@pytest.mark.anyio
async def test_a_raising_detokenizer_fails_only_its_request(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = IncrementalDetokenizer.add_tokens
    calls = {"n": 0}

    def add_tokens(self: IncrementalDetokenizer, token_ids: list[int]) -> None:
        if self.prompt_token_ids == POISON:
            calls["n"] += 1
            if calls["n"] == 2:  # after one token went out
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected: detokenizer failure")
        real(self, token_ids)

    monkeypatch.setattr(IncrementalDetokenizer, "add_tokens", add_tokens)
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, n=2)
        jobs = [(POISON, greedy(8))] + [(tokens(5, i), greedy(8)) for i in range(4)] + [(tokens(5, 9), params)]
        results = await run_all(engine, jobs)
        kind, exc = results[0]
        assert kind == "error" and type(exc) is EngineError, results[0]
        assert "processing its output failed" in str(exc) and "injected: detokenizer failure" in str(exc)
        assert isinstance(exc.__cause__, UnicodeDecodeError)
        assert results[1:] == [("ok", "length")] * 5
        await still_serves(engine)


# ---- a new engine after another, and aclose() frees memory ----------------------------------------
def rss_mb() -> float:
    gc.collect()
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


CYCLES = 8 if STRESS else 4


@pytest.mark.anyio
async def test_engines_start_and_close_cleanly_in_one_process_without_growing(llama_dir: Path) -> None:
    figures: list[float] = []
    for cycle in range(CYCLES):
        engine = AsyncEngine.from_pretrained(llama_dir)
        await engine.start()
        fmt = SamplingParams(temperature=0.0, max_tokens=8, response_format={"choice": ["alpha", "beta"]})
        await run_all(engine, [(tokens(6, i), greedy(8)) for i in range(8)] + [(tokens(5, 50), fmt)])
        handle = await engine.cache_prefix(tokens(32, cycle))
        await engine.generate([5, 6], greedy(2), prefix=handle)
        handle.release()
        await assert_settles_idle(engine)
        await engine.aclose()
        with pytest.raises(EngineClosedError):
            engine.stream([1, 2, 3], greedy(2))
        del engine, handle
        figures.append(rss_mb())
    print(f"\nRSS after each create/serve/aclose cycle (MB): {[round(f, 1) for f in figures]}")
    # The first cycle pays the one-off costs (torch kernels, xgrammar, tokenizer caches); each
    # later cycle must give back what it took. 25 MB over the later cycles is well under one
    # engine's footprint (its KV pool alone is larger), so a leaked engine would show.
    assert figures[-1] - figures[1] < 25.0, figures

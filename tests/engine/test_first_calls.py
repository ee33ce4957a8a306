"""Concurrent first calls: any number of them, from any tasks, threads and loops, start one
engine once and all succeed (issue: a second ``start()`` returned while the first was loading)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import anyio
import pytest

from kvloom import AsyncEngine, SamplingParams
from kvloom.errors import EngineClosedError
from kvloom.integrations.runtime import EngineRuntime

pytestmark = pytest.mark.anyio

GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_second_start_waits_for_the_first(llama_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(llama_dir)
    first = asyncio.create_task(engine.start())
    await asyncio.sleep(0)  # the first start is loading now
    await engine.start()  # returned at once before the fix, with the engine still loading
    out = await engine.generate([1, 2, 3], GREEDY)
    assert out.usage.completion_tokens == 3
    await first
    await engine.aclose()


async def test_concurrent_starts_and_generates_load_the_model_once(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = AsyncEngine.from_pretrained(llama_dir)
    loads = 0
    load = engine._lifecycle._load

    def counting_load():  # type: ignore[no-untyped-def]
        nonlocal loads
        loads += 1
        return load()

    monkeypatch.setattr(engine._lifecycle, "_load", counting_load)

    async def first_call(i: int) -> list[int]:
        await engine.start()
        return (await engine.generate([1, 2, 3 + i], GREEDY)).token_ids

    results = await asyncio.gather(*(first_call(i) for i in range(6)))
    assert loads == 1
    assert all(len(r) == 3 for r in results)
    await engine.aclose()
    engine_after = engine
    with pytest.raises(EngineClosedError, match="closed"):
        await engine_after.start()


async def test_generate_during_a_start_waits_for_it(llama_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(llama_dir)
    starting = asyncio.create_task(engine.start())
    await asyncio.sleep(0)
    out = await engine.generate([4, 5], GREEDY)  # no explicit await of the start
    assert len(out.token_ids) == 3
    await starting
    await engine.aclose()


async def test_a_failed_start_fails_every_waiter_and_can_be_retried(tmp_path: Path, llama_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(llama_dir)
    real_load = engine._lifecycle._load
    calls = 0

    def failing_once():  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk went away")
        return real_load()

    engine._lifecycle._load = failing_once  # type: ignore[method-assign]
    results = await asyncio.gather(engine.start(), engine.start(), engine.start(), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results), results
    await engine.start()  # a later start tries again
    assert (await engine.generate([1], GREEDY)).usage.completion_tokens == 3
    await engine.aclose()


async def test_a_cancelled_first_start_still_starts_the_engine(llama_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(llama_dir)
    first = asyncio.create_task(engine.start())
    await asyncio.sleep(0)
    second = asyncio.create_task(engine.start())
    await asyncio.sleep(0)
    first.cancel()
    await second  # the load went on: the second caller gets a running engine
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await engine.generate([1, 2], GREEDY)).usage.completion_tokens == 3
    await engine.aclose()


def test_start_from_another_loop_is_refused_clearly(llama_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(llama_dir)
    owner = asyncio.new_event_loop()
    thread = threading.Thread(target=owner.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(engine.start(), owner).result(timeout=120)
        with pytest.raises(RuntimeError, match="another event loop"):
            asyncio.run(engine.start())
        # The engine is untouched: its own loop still serves.
        out = asyncio.run_coroutine_threadsafe(engine.generate([1, 2], GREEDY), owner).result(timeout=60)
        assert out.usage.completion_tokens == 3
    finally:
        asyncio.run_coroutine_threadsafe(engine.aclose(), owner).result(timeout=60)
        owner.call_soon_threadsafe(owner.stop)
        thread.join(timeout=10)


def test_runtime_first_calls_from_many_threads_start_one_engine(llama_dir: Path) -> None:
    runtime = EngineRuntime(llama_dir)
    barrier = threading.Barrier(4)
    results: list[int] = []
    errors: list[BaseException] = []

    def first_call(i: int) -> None:
        barrier.wait()
        try:
            results.append(runtime.generate(prompt=[1, 2, 3 + i], params=GREEDY).usage.completion_tokens)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert not errors, errors
        assert results == [3, 3, 3, 3]
    finally:
        runtime.close()


async def test_runtime_first_async_calls_from_other_loops(llama_dir: Path) -> None:
    """``asyncio.gather`` of first ``agenerate``s (what LangChain's ``abatch`` does)."""
    runtime = EngineRuntime(llama_dir)
    try:
        outs = await asyncio.gather(*(runtime.agenerate(prompt=[1, 2, i + 3], params=GREEDY) for i in range(4)))
        assert [o.usage.completion_tokens for o in outs] == [3, 3, 3, 3]
    finally:
        await anyio.to_thread.run_sync(runtime.close)

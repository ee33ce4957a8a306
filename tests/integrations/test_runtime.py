"""``EngineRuntime``: the same engine from sync code, from its own loop, from other loops and
threads; streams that cross loops, abort when left, and raise bad input at the first chunk."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from kvloom import AsyncEngine, InvalidRequestError, SamplingParams
from kvloom.integrations.runtime import SAME_LOOP_SYNC_CALL, EngineRuntime
from tests.engine.helpers import SETTLE_TIMEOUT_S

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)


def test_an_owned_runtime_loads_nothing_until_used_and_serves_sync_and_async(llama_dir: Path) -> None:
    before = set(threading.enumerate())
    runtime = EngineRuntime(llama_dir, max_num_seqs=4)
    assert runtime.engine is None and set(threading.enumerate()) == before  # nothing started
    try:
        done = runtime.generate(prompt="hello there", params=PARAMS)
        assert len(done.token_ids) == 6 and runtime.engine is not None
        started = [t for t in set(threading.enumerate()) - before if t.name == "kvloom-runtime"]
        assert len(started) == 1

        async def from_another_loop() -> list[int]:
            return (await runtime.agenerate(prompt="hello there", params=PARAMS)).token_ids

        assert asyncio.run(from_another_loop()) == done.token_ids  # a second loop, same engine
        streamed = [t for chunk in runtime.stream(prompt="hello there", params=PARAMS) for t in chunk.token_ids]
        assert streamed == done.token_ids
    finally:
        runtime.close()
    assert not started[0].is_alive()


def test_sync_calls_work_from_inside_a_running_loop_when_the_runtime_owns_the_engine(llama_dir: Path) -> None:
    runtime = EngineRuntime(llama_dir)
    try:
        async def notebook_cell() -> list[int]:
            return runtime.generate(prompt="hi", params=PARAMS).token_ids  # blocks this loop, not the engine's

        assert len(asyncio.run(notebook_cell())) == 6
    finally:
        runtime.close()


@pytest.mark.asyncio
async def test_a_shared_engine_on_the_callers_loop(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        runtime = EngineRuntime(engine=engine)
        direct = await runtime.agenerate(prompt="abc", params=PARAMS)
        with pytest.raises(RuntimeError) as err:
            runtime.generate(prompt="abc", params=PARAMS)
        assert str(err.value) == SAME_LOOP_SYNC_CALL
        # From a worker thread the same sync call is fine: it waits for this loop to serve it.
        threaded = await asyncio.to_thread(runtime.generate, prompt="abc", params=PARAMS)
        assert threaded.token_ids == direct.token_ids
        chunks = [c async for c in runtime.astream(prompt="abc", params=PARAMS)]
        assert [t for c in chunks for t in c.token_ids] == direct.token_ids
        await engine.wait_idle(timeout=SETTLE_TIMEOUT_S)
        engine.assert_idle()


def test_streams_across_loops_abort_when_left_and_raise_bad_input(llama_dir: Path) -> None:
    runtime = EngineRuntime(llama_dir)
    try:
        async def main() -> None:
            ticks = 0

            async def heartbeat() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.005)
                    ticks += 1

            beat = asyncio.create_task(heartbeat())
            stream = runtime.astream(prompt="abc", params=LONG)
            async for chunk in stream:
                assert chunk.token_ids
                break
            await stream.aclose()  # type: ignore[attr-defined]
            with pytest.raises(InvalidRequestError, match="max_tokens"):
                async for _ in runtime.astream(prompt="abc", params=SamplingParams(max_tokens=10**9)):
                    pass
            await runtime.agenerate(prompt="abc", params=PARAMS)
            beat.cancel()
            assert ticks > 0  # this loop kept running while the engine's loop worked

        asyncio.run(main())
        engine = runtime.engine
        assert engine is not None

        async def idle(e: AsyncEngine) -> None:
            await e.wait_idle(timeout=SETTLE_TIMEOUT_S)
            e.assert_idle()  # the abandoned request's blocks came back

        runtime.run(idle)
        iterator = runtime.stream(prompt="abc", params=LONG)
        next(iterator)
        iterator.close()  # type: ignore[attr-defined]
        runtime.run(idle)
    finally:
        runtime.close()


def test_a_runtime_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="not both"):
        EngineRuntime()
    with pytest.raises(ValueError, match="not both"):
        EngineRuntime("dir", engine=AsyncEngine.from_pretrained("dir"))

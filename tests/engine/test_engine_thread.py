"""The async engine runs its compute on one thread: the load and every step of every turn run on the same
thread (not the event loop's, not whichever worker a pool hands out), so the process keeps one OpenMP
pool beside the loop thread's, which the loop frees (``engine.openmp_pool``). ``EngineThread`` itself:
jobs in order on one thread, errors re-raised on the loop, a cancelled waiter still waits for its job,
on asyncio and trio; and a freed OpenMP pool is rebuilt by the next parallel region."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import anyio
import pytest
import torch

from kvloom import AsyncEngine, SamplingParams
from kvloom.engine import openmp_pool
from kvloom.engine.engine_thread import EngineThread

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_jobs_run_in_order_on_one_thread_that_is_not_the_loops() -> None:
    thread = EngineThread()
    seen: list[tuple[int, int]] = []
    for i in range(5):
        assert await thread.run(lambda i=i: seen.append((i, threading.get_ident())) or i * i) == i * i
    idents = {ident for _, ident in seen}
    assert [i for i, _ in seen] == list(range(5)) and len(idents) == 1
    assert idents == {thread.ident} and threading.get_ident() not in idents
    thread.close()


async def test_an_error_of_a_job_is_raised_on_the_loop_and_the_thread_goes_on() -> None:
    thread = EngineThread()

    def fail() -> None:
        raise ValueError("bad job")

    with pytest.raises(ValueError, match="bad job"):
        await thread.run(fail)
    assert await thread.run(lambda: 7) == 7
    thread.close()


async def test_a_cancelled_waiter_waits_for_its_job_then_sees_the_cancellation() -> None:
    thread = EngineThread()
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.2)
        finished.set()

    with anyio.CancelScope() as scope:
        scope.cancel()
        await thread.run(slow)
        pytest.fail("the cancellation was not delivered")
    assert scope.cancelled_caught and finished.is_set()
    thread.close()


def test_the_thread_ends_on_close_and_when_collected() -> None:
    async def start(thread: EngineThread) -> int | None:
        await thread.run(lambda: None)
        return thread.ident

    for close in (True, False):
        thread = EngineThread()
        ident = anyio.run(start, thread)
        worker = next(t for t in threading.enumerate() if t.ident == ident)
        if close:
            thread.close()
        else:
            del thread
            gc.collect()
        worker.join(timeout=5)
        assert not worker.is_alive()


def test_a_freed_openmp_pool_is_rebuilt_by_the_next_parallel_region() -> None:
    x = torch.randn(512, 512)
    expected = x @ x
    if openmp_pool._libgomp() is None:  # another OpenMP runtime: nothing to free, and nothing breaks
        assert openmp_pool.release_calling_thread_pool() is False
    else:
        assert openmp_pool.release_calling_thread_pool() is True
    assert torch.equal(x @ x, expected)


async def test_the_load_and_every_step_run_on_the_engine_thread(llama_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(llama_dir)
    loads: list[int] = []
    lifecycle = engine._lifecycle  # reached into to watch where the work runs; not an API
    load = lifecycle._load
    lifecycle._load = lambda: (loads.append(threading.get_ident()), load())[1]  # type: ignore[method-assign]
    async with engine:
        steps: list[int] = []
        driver = lifecycle.parts.driver if lifecycle.parts is not None else None
        assert driver is not None
        run = driver.run
        driver.run = lambda step_input: (steps.append(threading.get_ident()), run(step_input))[1]  # type: ignore[method-assign]
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        async with anyio.create_task_group() as group:
            for i in range(3):  # requests arriving at different steps: several turns
                group.start_soon(engine.generate, f"prompt {i}", params)
                await anyio.sleep(0.01)
        await engine.generate("one more turn", params)
        assert len(steps) >= 6 and set(steps) == set(loads) == {lifecycle.engine_thread.ident}
        assert threading.get_ident() not in steps

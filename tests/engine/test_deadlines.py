"""Deadlines: ``timeout=`` per request and the engine's ``request_timeout``.

At the deadline (counted from submit: queueing and grammar compilation count) the request is
aborted within one step, its blocks are freed, and its stream raises ``RequestTimeoutError``
after the chunks it had already delivered. The other requests never notice.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import anyio
import pytest

from kvloom import LLM, AsyncEngine, InvalidRequestError, RequestTimeoutError, SamplingParams
from tests.engine.helpers import assert_settles_idle, greedy

pytestmark = pytest.mark.anyio

# Generous against a loaded 2-core machine: the deadline fires "within one step", and one
# step of the tiny model takes milliseconds, so anything near this bound is a real miss.
LATE = 5.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_request_times_out_mid_decode_after_its_chunks_and_frees_its_blocks(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        neighbour_expected = (await engine.generate([9, 8, 7], greedy(30))).token_ids
        received: list[int] = []
        start = time.monotonic()
        neighbour: list[int] = []

        async def run_neighbour() -> None:
            neighbour.extend((await engine.generate([9, 8, 7], greedy(30))).token_ids)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_neighbour)
            with pytest.raises(RequestTimeoutError, match="deadline") as info:
                async for chunk in engine.stream([1, 2, 3], greedy(500), timeout=0.2):
                    received.extend(chunk.token_ids)
        elapsed = time.monotonic() - start
        assert isinstance(info.value, TimeoutError)
        assert 0 < len(received) < 500, "chunks before the deadline are delivered"
        assert 0.2 <= elapsed < 0.2 + LATE
        assert neighbour == neighbour_expected
        assert engine.stats().num_timeouts == 1
        await assert_settles_idle(engine)


async def test_a_request_times_out_while_queued(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir, max_num_seqs=1) as engine:
        expected = (await engine.generate([4, 5, 6], greedy(200))).token_ids
        long = engine.stream([4, 5, 6], greedy(200))
        first = await long.__anext__()
        start = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            await engine.generate([1, 2, 3], greedy(4), timeout=0.2)  # never gets the one seat
        assert time.monotonic() - start < 0.2 + LATE
        rest = [t async for c in long for t in c.token_ids]
        assert first.token_ids + rest == expected
        assert engine.stats().num_timeouts == 1
        await assert_settles_idle(engine)


async def test_a_request_times_out_while_its_grammar_compiles(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        assert engine._parts is not None
        never: concurrent.futures.Future[object] = concurrent.futures.Future()
        engine._parts.grammars.submit = lambda p: never if p.response_format else None  # type: ignore[assignment,method-assign,return-value]
        fmt = SamplingParams(max_tokens=8, response_format={"choice": ["yes", "no"]})
        with pytest.raises(RequestTimeoutError):
            await engine.generate([1, 2, 3], fmt, timeout=0.3)
        assert (await engine.generate([1, 2, 3], greedy(5))).usage.completion_tokens == 5
        await assert_settles_idle(engine)


async def test_the_engine_default_applies_and_a_request_may_override_it(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir, request_timeout=0.3) as engine:
        with pytest.raises(RequestTimeoutError):
            async for _ in engine.stream([1, 2, 3], greedy(500)):
                pass
        done = await engine.generate([1, 2, 3], greedy(500), timeout=120)
        assert done.usage.completion_tokens == 500
        assert (await engine.generate([1, 2, 3], greedy(3))).finish_reason == "length"  # short: within 0.3 s
        await assert_settles_idle(engine)


async def test_a_bad_timeout_is_refused_naming_the_field(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        for bad in (0, -1.0):
            with pytest.raises(InvalidRequestError, match="timeout"):
                engine.stream([1, 2], greedy(2), timeout=bad)
        assert engine.stats().num_waiting == 0
    with pytest.raises(ValueError, match="request_timeout"):
        AsyncEngine.from_pretrained(llama_dir, request_timeout=0)


def test_llm_honours_request_timeout_and_leaves_nothing_behind(llama_dir: Path) -> None:
    llm = LLM(llama_dir, request_timeout=0.3)
    with pytest.raises(RequestTimeoutError):
        llm.generate([[1, 2, 3], [4, 5, 6]], greedy(500))
    llm.assert_idle()
    assert llm.generate([[1, 2, 3]], greedy(3))[0].usage.completion_tokens == 3

"""The async methods never block the caller's event loop, even when the engine runs on that
very loop (``KVLoomLLM(engine=...)``): a heartbeat task keeps ticking through ``achat``,
``astream_chat`` and ``astructured_predict``; a sync call from that loop is refused instead of
deadlocking it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.prompts import PromptTemplate
from pydantic import BaseModel, Field

from kvloom import AsyncEngine
from kvloom.integrations.llama_index import KVLoomLLM
from kvloom.integrations.runtime import SAME_LOOP_SYNC_CALL
from tests.engine.helpers import assert_settles_idle

TICK = 0.005
MESSAGES = [ChatMessage(role=MessageRole.USER, content="Tell me a story.")]


class Verdict(BaseModel):
    words: list[Literal["yes", "no", "maybe"]] = Field(min_length=6, max_length=6)


async def ticks_during(call: Callable[[], Awaitable[Any]]) -> tuple[int, float]:
    """How many ``TICK`` sleeps a heartbeat on this loop completes while ``call()`` runs, and how long it ran."""
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(TICK)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)
    start = time.perf_counter()
    await call()
    elapsed = time.perf_counter() - start
    beat.cancel()
    return ticks, elapsed


@pytest.mark.timing
@pytest.mark.asyncio
async def test_a_heartbeat_keeps_ticking_through_the_async_methods(demo_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(demo_dir) as engine:
        llm = KVLoomLLM(engine=engine, temperature=0.0, max_tokens=48)
        with pytest.raises(RuntimeError) as refused:
            llm.chat(MESSAGES)
        assert str(refused.value) == SAME_LOOP_SYNC_CALL

        async def stream_all() -> None:
            async for _ in await llm.astream_chat(MESSAGES, ignore_eos=True):
                pass

        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "achat": lambda: llm.achat(MESSAGES, ignore_eos=True),
            "astream_chat": stream_all,
            "astructured_predict": lambda: llm.astructured_predict(Verdict, PromptTemplate("Judge {x}."),
                                                                  llm_kwargs={"max_tokens": 200}, x="it"),
        }
        for name, call in calls.items():
            ticks, elapsed = await ticks_during(call)
            # A blocked loop completes ~0 ticks in the call; a free one ~elapsed / TICK. On a
            # shared 2-core machine a 5 ms sleep often takes 10-20 ms (the model's threads hold
            # the cores), so we ask for a fifth of the ideal: far above a blocked loop, far below
            # what an idle machine gives. The call must be long enough for that to mean something.
            assert elapsed > 0.1, f"{name}: too short to measure ({elapsed:.3f}s)"
            assert ticks >= elapsed / TICK / 5, f"{name}: {ticks} ticks in {elapsed:.3f}s"
        await assert_settles_idle(engine)

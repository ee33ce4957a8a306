"""Waiting for an engine to settle, then checking it holds nothing."""

from __future__ import annotations

import anyio

from kvloom import AsyncEngine


async def settle(engine: AsyncEngine, timeout: float = 30.0) -> None:
    """Until the background loop has handed everything over and the engine thread holds no
    work: aborts and handle releases land at the next step boundary, not at once."""
    loop = engine._loop
    assert loop is not None, "the engine is not running"
    with anyio.fail_after(timeout):
        while not loop.is_idle:
            await anyio.sleep(0.005)


async def assert_settles_idle(engine: AsyncEngine) -> None:
    """``settle``, then the engine's own invariant: no request, every block free, no pin."""
    await settle(engine)
    engine.assert_idle()

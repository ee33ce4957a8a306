"""Shared by the engine tests: requests, and waiting for an engine to settle."""

from __future__ import annotations

import random

import anyio

from kvloom import AsyncEngine, SamplingParams


def greedy(n: int) -> SamplingParams:
    """Exactly ``n`` greedy tokens (EOS ignored)."""
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def tokens(n: int, seed: int) -> list[int]:
    """``n`` random token ids of the tiny vocabulary (no special tokens)."""
    rng = random.Random(seed)
    return [rng.randrange(5, 512) for _ in range(n)]


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

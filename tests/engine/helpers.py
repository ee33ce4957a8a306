"""Shared by the engine tests: requests, and checking an engine settles idle."""

from __future__ import annotations

import random

from kvloom import AsyncEngine, SamplingParams


def greedy(n: int) -> SamplingParams:
    """Exactly ``n`` greedy tokens (EOS ignored)."""
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def tokens(n: int, seed: int) -> list[int]:
    """``n`` random token ids of the tiny vocabulary (no special tokens)."""
    rng = random.Random(seed)
    return [rng.randrange(5, 512) for _ in range(n)]


SETTLE_TIMEOUT_S = 30.0
"""How long an engine may take to become idle once its requests ended or were aborted: aborts land
within one step (milliseconds here); the bound only turns a hang into a failure."""


async def assert_settles_idle(engine: AsyncEngine, timeout: float = SETTLE_TIMEOUT_S) -> None:
    """``engine.wait_idle()`` (aborts and handle releases land at the next step boundary, not at
    once), then the engine's own invariant: no request, every block free, no pin."""
    await engine.wait_idle(timeout=timeout)
    engine.assert_idle()

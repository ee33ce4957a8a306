"""How responsive the event loop stays while many streams decode.

Run: python examples/loop_lag.py [MODEL_DIR]   (default: the standard ~155M benchmark checkpoint)
An asyncio task sleeps 5 ms in a loop; its overshoot is the lag other coroutines would see.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

from kvloom import AsyncEngine, SamplingParams


async def main(model_dir: str, num_streams: int = 64, max_tokens: int = 32) -> None:
    async with AsyncEngine.from_pretrained(model_dir) as engine:
        rng = random.Random(0)
        prompts = [[rng.randrange(1000) for _ in range(rng.randint(32, 256))] for _ in range(num_streams)]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        lags: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                start = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - start - 0.005)

        async def run(prompt: list[int]) -> None:
            async for _ in engine.stream(prompt, params):
                pass

        tick = asyncio.create_task(ticker())
        start = time.perf_counter()
        await asyncio.gather(*(run(p) for p in prompts))
        done.set()
        await tick
        lags.sort()
        print(
            f"{num_streams} streams x {max_tokens} tokens in {time.perf_counter() - start:.1f} s; "
            f"5 ms ticker lag over {len(lags)} ticks: p50 {lags[len(lags) // 2] * 1e3:.2f} ms, "
            f"p99 {lags[int(0.99 * len(lags))] * 1e3:.2f} ms, max {lags[-1] * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        model = sys.argv[1]
    else:
        from kvloom.bench.workload import STANDARD_MODEL, cached_checkpoint

        model = str(cached_checkpoint(STANDARD_MODEL)[0])
    asyncio.run(main(model))

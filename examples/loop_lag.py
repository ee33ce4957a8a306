"""How responsive the event loop stays while many streams decode.

Run: python examples/loop_lag.py [MODEL_DIR] [--streams 64] [--max-tokens 32]
An asyncio task sleeps 5 ms in a loop; its overshoot is the lag other coroutines would see.
Without MODEL_DIR it uses the small demo checkpoint; a bigger model (longer steps in the worker
thread) is the harder test: the lag should stay in milliseconds all the same.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

from kvloom import AsyncEngine, SamplingParams
from kvloom.demo import demo_model_dir

WORDS = ("the", "cache", "block", "token", "stream", "batch", "prefix", "model", "answer", "question")


async def main(model_dir: str | Path, num_streams: int = 64, max_tokens: int = 32) -> None:
    async with AsyncEngine.from_pretrained(model_dir) as engine:
        rng = random.Random(0)
        prompts = [" ".join(rng.choices(WORDS, k=rng.randint(16, 128))) for _ in range(num_streams)]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        lags: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                start = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - start - 0.005)

        async def run(prompt: str) -> None:
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", help="a HF checkpoint directory (default: the demo model)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams (default 64)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per stream (default 32)")
    args = parser.parse_args()
    model = args.model_dir or demo_model_dir()  # the demo checkpoint is built once into the cache
    asyncio.run(main(model, args.streams, args.max_tokens))

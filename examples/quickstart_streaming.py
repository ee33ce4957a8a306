"""The smallest streaming program: an AsyncEngine, one chat request, tokens printed as they arrive.

Run: python examples/quickstart_streaming.py [MODEL_DIR]
Without MODEL_DIR it uses the shipped demo model (5M parameters, trained on a
synthetic corpus: general questions get simple, often nonsensical answers).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from kvloom import AsyncEngine, SamplingParams
from kvloom.demo import demo_model_dir


async def main(model_dir: str | Path) -> None:
    # Weights load in a worker thread when the block is entered; leaving it stops the engine.
    async with AsyncEngine.from_pretrained(model_dir) as engine:
        messages = [{"role": "user", "content": "Tell me a short story about a lighthouse."}]
        num_chunks = 0
        print("assistant: ", end="", flush=True)
        async for chunk in engine.stream(messages=messages, params=SamplingParams(max_tokens=48, seed=0)):
            print(chunk.text, end="", flush=True)
            num_chunks += 1
            if chunk.usage is not None:  # set on the last chunk only
                usage, finish_reason = chunk.usage, chunk.finish_reason
        print()
        print(f"chunks: {num_chunks}, finish_reason: {finish_reason}")
        print(f"usage: prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens} "
              f"time_to_first_token={usage.time_to_first_token:.3f}s total_time={usage.total_time:.3f}s")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else demo_model_dir()))  # the demo is built once

"""Why ``AsyncEngine.stream`` decodes slower than ``LLM.generate`` at one stream (docs/benchmarks.md, the
``bench single`` section): the engine's step times under each, and the event-loop thread's CPU time a token.

    python docs/measurements/stream_step_times.py
    OMP_WAIT_POLICY=PASSIVE python docs/measurements/stream_step_times.py   # OpenMP threads sleep, not spin
    python docs/measurements/stream_step_times.py int8                      # quantization="int8"

The standard ~155M checkpoint, float32, one 256-token prompt of random ids, 129 greedy tokens; the
second request of each is measured. Each ``EngineDriver.run`` call (one step) is timed on the engine
thread. If the steps themselves are slower under ``stream``, the loop's work is competing with the
step for the cores; if the steps are as fast but the wall time is longer, the hand-off is the cost.
"""

import asyncio
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from kvloom import LLM, AsyncEngine, SamplingParams
from kvloom.models.checkpoints import STANDARD_MODEL, cached_checkpoint

CONFIG: dict[str, Any] = {"dtype": "float32", "enable_prefix_caching": False}


def timed(driver: Any, times: list[float]) -> None:
    """Record the wall time of every ``driver.run`` (one step each) in ``times``."""
    run: Callable[[Any], Any] = driver.run

    def wrapper(step_input: Any) -> Any:
        start = time.perf_counter()
        result = run(step_input)
        times.append(time.perf_counter() - start)
        return result

    driver.run = wrapper


async def streamed(model: Any, prompt: list[int], params: SamplingParams) -> None:
    engine = AsyncEngine.from_pretrained(model, **CONFIG)
    await engine.start()
    steps: list[float] = []
    timed(engine._parts.driver, steps)  # a measurement's reach into the engine, not an API
    for _ in range(2):  # the first request warms up; the second is measured
        steps.clear()
        tokens, first, cpu = 0, None, time.thread_time()
        async for chunk in engine.stream(prompt, params):
            tokens += len(chunk.token_ids)
            first = first or time.perf_counter()
        wall = time.perf_counter() - (first or 0.0)
        cpu = time.thread_time() - cpu
    print(f"stream:   median step {1e3 * statistics.median(steps[2:]):.1f} ms, decode {(tokens - 1) / wall:.1f} tok/s, "
          f"event-loop thread CPU {1e3 * cpu / tokens:.2f} ms a token")
    await engine.aclose()


def main() -> None:
    if len(sys.argv) > 1:
        CONFIG["quantization"] = sys.argv[1]
    model = cached_checkpoint(STANDARD_MODEL)[0]
    rng = random.Random(0)
    prompt = [rng.randrange(100, 32000) for _ in range(256)]
    params = SamplingParams(max_tokens=129, temperature=0.0, ignore_eos=True)
    llm = LLM(model, **CONFIG)
    steps: list[float] = []
    timed(llm.driver, steps)
    llm.generate([prompt], params, use_tqdm=False)
    steps.clear()
    usage = llm.generate([prompt], params, use_tqdm=False)[0].usage
    assert usage.total_time is not None and usage.time_to_first_token is not None
    print(f"generate: median step {1e3 * statistics.median(steps[2:]):.1f} ms, decode "
          f"{128 / (usage.total_time - usage.time_to_first_token):.1f} tok/s")
    llm.close()
    asyncio.run(streamed(model, prompt, params))


if __name__ == "__main__":
    main()

"""The first constrained tool call against later ones, token by token (docs/benchmarks.md, "The first
constrained tool call, and where a slow one's time goes").

    python docs/measurements/first_tool_call.py            # 3 calls on one fresh engine
    python docs/measurements/first_tool_call.py 5 1        # 5 calls, torch.set_num_threads(1)

One ``AsyncEngine`` on the demo checkpoint (float32); each call streams a chat request with three
tools, ``tool_choice="required"``, ``parallel_tool_calls=True``, temperature 1.0 with a fixed seed,
at most 256 tokens. Prints per call: wall time, time to the first token, the longest gap between
tokens, gaps over 50 ms, the process's CPU seconds and the event loop's longest stall; then the
engine's grammar and constrained-step stats. Run it on a quiet machine, and again under load to
see contention for the cores (the stats then show slow steps with fast processors).
"""

import asyncio
import dataclasses
import resource
import sys
import time

from kvloom import AsyncEngine, SamplingParams
from kvloom.demo import demo_model_dir

TOOLS = [
    {"type": "function", "function": {
        "name": "book_trip", "description": "Book a trip.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 12},
            "travellers": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                "required": ["name", "age"]}, "minItems": 1, "maxItems": 2},
            "class": {"enum": ["economy", "business"]}, "flexible": {"type": "boolean"}},
            "required": ["city", "travellers", "class"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 10},
                       "limit": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["q"]}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                       "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}},
]
MESSAGES = [{"role": "user", "content": "Book me a trip to Paris and tell me the weather there."}]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_call(engine: AsyncEngine, seed: int) -> dict[str, float]:
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=256)
    stall, ticking = [0.0], [True]

    async def ticker() -> None:  # the event loop's longest stall during the call
        while ticking[0]:
            began = time.perf_counter()
            await asyncio.sleep(0.001)
            stall[0] = max(stall[0], time.perf_counter() - began - 0.001)

    tick = asyncio.create_task(ticker())
    cpu0, began, stamps = cpu_seconds(), time.perf_counter(), []
    async for chunk in engine.stream(messages=MESSAGES, params=params, tools=TOOLS, tool_choice="required",
                                     parallel_tool_calls=True):
        stamps.extend([time.perf_counter()] * max(len(chunk.token_ids), 1))
    wall, ticking[0] = time.perf_counter() - began, False
    await tick
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)] or [0.0]
    return {"wall_s": round(wall, 3), "ttft_s": round(stamps[0] - began, 3), "tokens": len(stamps),
            "max_gap_s": round(max(gaps), 3), "gaps_over_50ms": sum(g > 0.05 for g in gaps),
            "cpu_s": round(cpu_seconds() - cpu0, 2), "loop_stall_s": round(stall[0], 3)}


async def main(calls: int) -> None:
    async with AsyncEngine.from_pretrained(demo_model_dir(), dtype="float32") as engine:
        for i in range(calls):
            print(f"call {i + 1}", await one_call(engine, seed=2), flush=True)
        stats = engine.stats()
    print({f.name: getattr(stats, f.name) for f in dataclasses.fields(stats) if "ms" in f.name or "compile" in f.name})


if __name__ == "__main__":
    if len(sys.argv) > 2:
        import torch

        torch.set_num_threads(int(sys.argv[2]))
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))

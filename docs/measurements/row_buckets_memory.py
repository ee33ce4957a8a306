"""RSS of a serving mix, round by round: packed GEMMs at bucketed row counts vs exact ones.

    python docs/measurements/row_buckets_memory.py bucket 256 2000 5        # kvloom as shipped
    python docs/measurements/row_buckets_memory.py exact 256 2000 5         # exact row counts
    python docs/measurements/row_buckets_memory.py exact 256 2000 5 torch   # MKL, no packing
    python docs/measurements/row_buckets_memory.py warm 256 2000 5          # bucketed, warmup=True

Arguments: mode (bucket | exact | warm: bucketed with ``warmup=True``), hidden size, requests a round, rounds, [cpu_gemm]. One
``AsyncEngine`` on a one-layer random checkpoint; requests arrive over 2 s with 1-40 prompt
tokens and 1-16 output tokens, 30% cancelled mid-stream. Prints RSS (MB) and the number of
distinct GEMM row counts seen after each round. Results: docs/benchmarks.md.
"""

import asyncio
import gc
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil

import kvloom.layers.linear as linear
from kvloom import AsyncEngine, SamplingParams
from kvloom.models.tiny import build_checkpoint

MODE, HIDDEN, PER_ROUND, ROUNDS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
GEMM = sys.argv[5] if len(sys.argv) > 5 else "auto"
seen: set[int] = set()
bucketed = linear.padded_rows


def recording(rows: int) -> int:
    padded = rows if MODE == "exact" else bucketed(rows)
    seen.add(padded)
    return padded


linear.padded_rows = recording


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


async def one(engine: AsyncEngine, rng: random.Random) -> None:
    ids = [rng.randrange(3, 500) for _ in range(rng.randint(1, 40))]
    params = SamplingParams(max_tokens=rng.randint(1, 16), temperature=0.8, ignore_eos=True)
    cancel_at = rng.randint(1, 8) if rng.random() < 0.3 else None
    await asyncio.sleep(rng.random() * 2.0)
    n = 0
    async for _ in engine.stream(ids, params):
        n += 1
        if cancel_at is not None and n >= cancel_at:
            break


async def main(model: Path) -> None:
    rng = random.Random(0)
    async with AsyncEngine.from_pretrained(model, max_waiting=100_000, cpu_gemm=GEMM,
                                           warmup=MODE == "warm") as engine:
        print(f"{MODE} after start: RSS {rss_mb():.0f} MB, sizes seen {len(seen)}", flush=True)
        for r in range(ROUNDS):
            began = time.perf_counter()
            await asyncio.gather(*(one(engine, rng) for _ in range(PER_ROUND)))
            print(f"{MODE} round {r}: RSS {rss_mb():.0f} MB, sizes seen {len(seen)}, "
                  f"{time.perf_counter() - began:.1f} s", flush=True)


if __name__ == "__main__":
    directory = Path(tempfile.mkdtemp()) / "model"
    build_checkpoint(directory, arch="llama", vocab_size=512, hidden_size=HIDDEN, num_layers=1, num_heads=4,
                     num_kv_heads=2, intermediate_size=HIDDEN * 2, max_position_embeddings=512, seed=0)
    asyncio.run(main(directory))

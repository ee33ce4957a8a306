"""Many fine-tunes on one base model: two LoRA adapters and the base model in one batch.

Run: python examples/multi_lora.py [MODEL_DIR [ADAPTER_DIR ...]]
Without adapter directories it writes two random rank-8 adapters in PEFT's format into a
temporary folder (your own come from ``peft``'s ``save_pretrained``). Without MODEL_DIR it uses
the shipped demo model (5M parameters, trained on a
synthetic corpus: general questions get simple, often nonsensical answers).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from kvloom import AsyncEngine, SamplingParams
from kvloom.demo import demo_model_dir


async def main() -> None:
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else demo_model_dir()  # built once into the cache
    with tempfile.TemporaryDirectory(prefix="kvloom-lora-example-") as tmp:
        adapters = [Path(p) for p in sys.argv[2:]]
        if not adapters:
            from kvloom.lora.synthetic import write_random_adapter
            from kvloom.models.config import load_model_config

            config = load_model_config(base)
            adapters = [write_random_adapter(Path(tmp) / f"tenant-{i}", config, r=8, seed=i) for i in range(2)]
        async with AsyncEngine.from_pretrained(base, max_loras=2, max_lora_rank=16) as engine:
            for i, path in enumerate(adapters):
                await engine.load_adapter(f"tenant-{i}", path)  # read off the event loop
            print("loaded:", ", ".join(f"{a.name} (rank {a.rank})" for a in engine.adapters()))
            routing = [None, *(a.name for a in engine.adapters())]
            greedy = SamplingParams(temperature=0.0, max_tokens=16)
            outs = await asyncio.gather(*(engine.generate("Write a haiku about caching", greedy, adapter=name)
                                          for name in routing))
            for name, out in zip(routing, outs, strict=True):
                print(f"{name or 'base model':>10}: {out.text!r}")


if __name__ == "__main__":
    asyncio.run(main())

"""Outputs an application can parse: a pydantic model, a regex and a choice, in one batch.

Run: python examples/structured_output.py [MODEL_DIR]
Without MODEL_DIR it uses the shipped demo model (5M parameters, trained on a synthetic corpus:
the values are simple and sometimes wrong; every output parses, because the grammar, not the model,
decides what may be written).
"""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Literal

from pydantic import BaseModel, Field

from kvloom import AsyncEngine, SamplingParams
from kvloom.demo import demo_model_dir


class Ticket(BaseModel):
    title: str = Field(max_length=30)
    priority: Literal["low", "medium", "high"]
    estimate_hours: int = Field(ge=1, le=40)


SKU = r"[A-Z]{3}-\d{4}"


async def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else demo_model_dir()  # built once into the cache
    async with AsyncEngine.from_pretrained(model_dir) as engine:
        ticket, sku, answer = await asyncio.gather(
            engine.generate("File a ticket for the login bug as JSON:",
                            SamplingParams(response_format=Ticket, temperature=0.8, seed=1, max_tokens=120)),
            engine.generate("The part number is", SamplingParams(response_format={"regex": SKU}, seed=2)),
            engine.generate("Is the sky blue?", SamplingParams(response_format={"choice": ["yes", "no"]}, seed=3)),
        )
        if ticket.finish_reason == "stop":  # "length" if max_tokens cut it short
            print("ticket:", Ticket.model_validate_json(ticket.text))
        else:
            print("ticket (cut at max_tokens):", ticket.text)
        assert re.fullmatch(SKU, sku.text)
        print("sku:   ", sku.text)
        print("answer:", answer.text)


if __name__ == "__main__":  # the guard matters: outlines' compile pool starts processes
    asyncio.run(main())

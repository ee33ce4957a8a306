"""Batch generation with the synchronous ``LLM`` facade.

Run: python examples/offline_batch.py [MODEL_DIR]
Without MODEL_DIR it uses the shipped demo model (5M parameters, trained on a
synthetic corpus: general questions get simple, often nonsensical answers).
"""

from __future__ import annotations

import sys

from kvloom import LLM, SamplingParams
from kvloom.demo import demo_model_dir


def main() -> None:
    model_dir = sys.argv[1] if len(sys.argv) > 1 else demo_model_dir()  # built once into the cache
    llm = LLM(model_dir)
    prompts = ["Once upon a time", "The capital of France is", "def hello(name):"]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    for out in llm.generate(prompts, greedy):
        print(f"{out.text!r}  [{out.finish_reason}, {out.usage.completion_tokens} tokens]")
    # Same seed, same tokens, whatever else is in the batch.
    seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=24, n=2)
    for choice in llm.generate("Tell me a story", seeded)[0].choices:
        print(choice.index, repr(choice.text))


if __name__ == "__main__":
    main()

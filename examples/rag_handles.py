"""RAG with one prefix handle per document: each document is prefilled once, every question reuses it.

Run: python examples/rag_handles.py [MODEL_DIR]
A handle pins its document's KV blocks, so questions about that document skip most of their
prefill (``usage.cached_tokens``) however many other requests pass through the cache meanwhile.
Without MODEL_DIR it uses the shipped demo model (5M parameters, trained on a
synthetic corpus to answer from a passage: right about three times in four).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from kvloom import AsyncEngine, SamplingParams
from kvloom.demo import demo_model_dir

DOCUMENTS = {
    "refunds": "Refund policy. Orders can be returned within 30 days of delivery for a full refund. "
               "Items must be unused and in their original packaging. Refunds reach the original "
               "payment method within 5 business days after the return is received.",
    "shipping": "Shipping. Standard delivery takes 3 to 5 business days and is free above 50 euros. "
                "Express delivery takes one business day and costs 9 euros. We ship to every country "
                "in the European Union.",
}
QUESTIONS = [
    ("refunds", "How long do I have to return an order?"),
    ("shipping", "How much does express delivery cost?"),
    ("refunds", "When will I get my money back?"),
    ("shipping", "Is delivery free?"),
]


def system_message(document: str) -> dict[str, str]:
    return {"role": "system", "content": f"Answer from this document only.\n\n{document}"}


async def main(model_dir: str | Path) -> None:
    async with AsyncEngine.from_pretrained(model_dir) as engine:
        # One handle per document: its system turn is prefilled once and its whole blocks pinned.
        handles = {name: await engine.cache_prefix(messages=[system_message(doc)]) for name, doc in DOCUMENTS.items()}
        for name, handle in handles.items():
            print(f"cached {name}: {handle.num_tokens} tokens, {handle.num_cached_tokens} in "
                  f"{handle.num_blocks} pinned blocks")
        print(f"live handles: {len(engine.prefixes())}")

        # The questions run concurrently in one batch; each continues its document's handle.
        params = SamplingParams(max_tokens=16, seed=0)
        answers = await asyncio.gather(*(
            engine.generate(messages=[{"role": "user", "content": question}], prefix=handles[name], params=params)
            for name, question in QUESTIONS))
        for (name, question), answer in zip(QUESTIONS, answers, strict=True):
            usage = answer.usage
            print(f"[{name}] {question} -> cached {usage.cached_tokens} of {usage.prompt_tokens} prompt tokens; "
                  f"answer {answer.text!r}")

        for handle in handles.values():
            print(f"released {handle.handle_id} after {handle.hits} questions")
            handle.release()  # unpinned; the blocks stay reusable until evicted
        print(f"live handles: {len(engine.prefixes())}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else demo_model_dir()))  # the demo is built once

"""``python -m kvloom demo``: a few chat prompts answered concurrently in one batch.

Without ``--model`` it runs on a small Llama-shaped checkpoint with random weights and a
locally trained tokenizer, built once into the user's cache directory (no download). The
text is then noise; what the demo shows is the engine: every prompt goes through the chat
template, all of them are batched together in one ``LLM.generate`` call over the paged KV
cache, and the throughput is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The demo's checkpoints are specified in kvloom.models.checkpoints; tests and examples name them from here.
from kvloom.models.checkpoints import DEMO_MODEL, TINY_DEMO_MODEL, cached_checkpoint

__all__ = ["DEMO_MODEL", "PROMPTS", "TINY_DEMO_MODEL", "add_arguments", "demo_model_dir", "run"]


def demo_model_dir() -> Path:
    """The demo checkpoint's directory, built into the user's cache on first use (a few seconds,
    no download). Examples and integration tests run on it."""
    return cached_checkpoint(DEMO_MODEL, log=False)[0]


PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain a paged KV cache in one sentence.",
    "How many days are in a week?",
    "Give me three names for a robot who paints.",
    "What does continuous batching do?",
    "Translate 'good morning' into Spanish.",
    "Summarize the story of a journey of a thousand miles.",
)

RANDOM_WEIGHTS_NOTICE = (
    "NOTE: the built-in demo model has RANDOM WEIGHTS (it was never trained), so the answers below\n"
    "are noise. What the demo shows is the engine: chat template, one batch, paged KV cache.\n"
    "For real answers, point it at a Hugging Face checkpoint directory (Llama, Mistral, Qwen2 or\n"
    "Qwen3: config.json + safetensors + tokenizer):  python -m kvloom demo --model DIR"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvloom demo``."""
    parser.add_argument("--model", type=Path, help="a HF checkpoint directory (default: a random-weight demo model)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens to generate per answer (default 48)")
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts answered in one batch (default 8)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    # Tests: the same code path on a much smaller random model.
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def _conversations(num_prompts: int) -> list[list[dict[str, Any]]]:
    return [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(num_prompts)]


def _one_line(text: str, limit: int = 160) -> str:
    """One terminal-safe line: whitespace runs become a space, control characters a U+FFFD."""
    flat = "".join(ch if ch.isprintable() else "\ufffd" for ch in " ".join(text.split()))
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Build or find the model, answer ``--num-prompts`` prompts in one batch, print tokens/s."""
    if args.max_tokens < 1 or args.num_prompts < 1:
        print("demo: --max-tokens and --num-prompts must be >= 1", file=sys.stderr)
        return 2
    started = time.perf_counter()
    random_weights = args.model is None
    if random_weights:
        spec = TINY_DEMO_MODEL if args.tiny else DEMO_MODEL
        model_dir, built = cached_checkpoint(spec)
        if built:
            print(f"built demo checkpoint in {time.perf_counter() - started:.1f} s: {model_dir}")
        print(RANDOM_WEIGHTS_NOTICE + "\n")
    else:
        model_dir = args.model

    import kvloom

    load_start = time.perf_counter()
    llm = kvloom.LLM(model_dir, dtype=args.dtype)
    print(f"loaded {model_dir} in {time.perf_counter() - load_start:.1f} s")
    if llm.tokenizer is None:
        print(f"demo: {model_dir} has no tokenizer; the demo needs one for chat prompts", file=sys.stderr)
        return 2
    if getattr(llm.tokenizer, "chat_template", None) is None:
        print(f"demo: {model_dir}'s tokenizer has no chat template", file=sys.stderr)
        return 2

    conversations = _conversations(args.num_prompts)
    params = kvloom.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    gen_start = time.perf_counter()
    completions = llm.chat(conversations, params)
    elapsed = time.perf_counter() - gen_start

    for i, (conv, completion) in enumerate(zip(conversations, completions, strict=True)):
        print(f"\n[{i}] user: {conv[0]['content']}")
        print(f"    assistant ({len(completion.token_ids)} tokens, {completion.finish_reason}): "
              f"{_one_line(completion.text)}")
    num_tokens = sum(len(c.token_ids) for c in completions)
    print(
        f"\n{len(completions)} prompts in one batch: {num_tokens} tokens in {elapsed:.2f} s = "
        f"{num_tokens / elapsed:.1f} tokens/s (total time {time.perf_counter() - started:.1f} s)"
    )
    if random_weights:
        print("(random weights: the text is noise; try --model DIR with a real checkpoint)")
    return 0

"""``python -m kvloom demo``: the engine answering on the demo model, or on your checkpoint.

Without ``--model`` it runs on the demo model that ships in the package (``kvloom.demo_model``: a
5M-parameter Llama the project trained on its own synthetic corpus, no download): questions about a
passage in one batch, a tool call run and answered, a JSON extraction with and without a grammar
(``kvloom.demo_showcase``). With ``--model DIR`` it answers a few general chat prompts in one batch
on that checkpoint. Either way it prints the throughput.
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
    """The trained demo model's checkpoint directory (shipped in the package). Examples run on it."""
    from kvloom.demo_model.shipped import shipped_model_dir

    return shipped_model_dir()


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
    "NOTE: --tiny runs a model with RANDOM WEIGHTS (it was never trained), so the answers below\n"
    "are noise. What it shows is the engine: chat template, one batch, paged KV cache."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvloom demo``."""
    parser.add_argument("--model", type=Path, help="a HF checkpoint directory (default: the shipped demo model)")
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
    random_weights = args.tiny and args.model is None
    if random_weights:
        model_dir, built = cached_checkpoint(TINY_DEMO_MODEL)
        if built:
            print(f"built demo checkpoint in {time.perf_counter() - started:.1f} s: {model_dir}")
        print(RANDOM_WEIGHTS_NOTICE + "\n")
    elif args.model is None:
        return _run_demo_model(args, started)
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
        print("(random weights: the text is noise; run without --tiny for the trained demo model)")
    return 0


def _run_demo_model(args: argparse.Namespace, started: float) -> int:
    """The shipped demo model: a passage's questions, a tool call and its answer, a JSON extraction."""
    import kvloom
    from kvloom import demo_showcase
    from kvloom.demo_model.shipped import NOTICE, shipped_model_dir

    model_dir = shipped_model_dir()
    llm = kvloom.LLM(model_dir, dtype=args.dtype)
    print(f"The demo model: {NOTICE}\nloaded {model_dir} in {time.perf_counter() - started:.1f} s\n")
    params = kvloom.SamplingParams(max_tokens=max(args.max_tokens, 64), temperature=args.temperature)
    gen_start = time.perf_counter()
    tokens = demo_showcase.show_passage(llm, params)
    tokens += demo_showcase.show_tool(llm, params)
    tokens += demo_showcase.show_json(llm, params)
    elapsed = time.perf_counter() - gen_start
    print(f"\n{tokens} tokens generated in {elapsed:.2f} s = {tokens / elapsed:.1f} tokens/s "
          f"(total time {time.perf_counter() - started:.1f} s)\n"
          "Your own checkpoint (Llama, Mistral, Qwen2 or Qwen3 directory):  python -m kvloom demo --model DIR")
    llm.close()
    return 0

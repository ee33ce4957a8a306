"""``python -m kvloom bench lora``: throughput with 0, 1, 4 and 16 LoRA adapters in the batch.

The standard workload (64 random-token prompts, 64 output tokens each, greedy, EOS ignored,
all submitted at once through ``LLM.generate``) runs on one engine per adapter count: the base
model alone, then with every request routed round-robin to one of K random rank-``--rank``
adapters on all seven projections (``kvloom.lora.synthetic``, written in PEFT's format and
loaded from disk like a user's adapter). ``max_loras`` is the largest K, so every adapter is
resident. Each figure is the best of ``--repeats`` timed runs after an untimed warm-up (one
short request per adapter, which also loads every adapter into its slot); the engines stay
up and take turns, one run each per round, so the machine's drift hits every count alike.
Prefix caching is off: the repeats resend the same prompts and would otherwise measure the
cache. The ratio is tokens/s with K adapters over tokens/s of the base model in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvloom.bench.runner import System, add_quick, refuse, start, take_turns, workload_prompts, write_result
from kvloom.bench.settings import add_kvloom_config, kvloom_config, parse_config
from kvloom.bench.workload import Workload

SCHEMA_VERSION = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvloom bench lora``."""
    w = Workload()
    parser.add_argument("--model", type=Path, help="HF checkpoint dir (default: the standard ~155M random checkpoint)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--adapters", default="0,1,4,16", help="adapter counts to measure, comma separated")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=w.num_requests)
    parser.add_argument("--output-len", type=int, default=w.output_len)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per adapter count, round-robin; best kept")
    parser.add_argument("--seed", type=int, default=w.seed)
    add_kvloom_config(parser)
    add_quick(parser)


class _Setup:
    """One engine with ``len(adapter_dirs)`` adapters loaded and warmed, routed round-robin."""

    def __init__(self, model_dir: Path, config: dict[str, Any], prompts: list[list[int]], output_len: int,
                 adapter_dirs: list[Path]) -> None:
        from kvloom import LLM, SamplingParams

        self.llm = LLM(model_dir, **config)
        self.prompts = prompts
        self.count = len(adapter_dirs)
        self.num_tokens = len(prompts) * output_len
        names = [f"adapter-{k}" for k in range(len(adapter_dirs))]
        for name, path in zip(names, adapter_dirs, strict=True):
            self.llm.load_adapter(name, path)
        self.routing: list[str | None] = [names[i % len(names)] if names else None for i in range(len(prompts))]
        self.params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        # Warm-up: one short request per adapter (each reaches its slot).
        self.llm.generate([prompts[0][:8]] * max(1, len(names)), self.params.model_copy(update={"max_tokens": 2}),
                          adapter=names or None)
        self.walls: list[float] = []
        self.outputs: list[list[int]] = []

    def time_once(self) -> None:
        """One timed run of every prompt; prints its rate."""
        began = time.perf_counter()
        results = self.llm.generate(self.prompts, self.params, adapter=self.routing)
        self.walls.append(time.perf_counter() - began)
        self.outputs = [r.token_ids for r in results]
        print(f"  run {len(self.walls)}: {self.count:>2} adapters: {self.num_tokens / self.walls[-1]:.1f} tok/s",
              flush=True)

    def result(self) -> dict[str, Any]:
        self.llm.close()
        return {"adapters": self.count, "wall_s": min(self.walls), "walls_s": self.walls,
                "tokens_per_s": self.num_tokens / min(self.walls), "outputs": self.outputs}


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the benchmark; prints a table and the ratios to the base model."""
    from kvloom.lora.synthetic import write_random_adapter
    from kvloom.models.config import load_model_config

    if args.repeats < 1 or args.rank < 1:
        return refuse("lora", "--repeats and --rank must be >= 1")
    workload = Workload(num_requests=args.num_requests, output_len=args.output_len, seed=args.seed)
    bench = start("lora", argv, args.model, args.quick)
    prompts = workload_prompts(bench.model_dir, workload,
                               f"adapters {args.adapters} (rank {args.rank}, all 7 projections), round-robin routing")
    counts = [int(c) for c in args.adapters.split(",") if c]
    model_config = load_model_config(bench.model_dir)
    # float32 as before: the adapters' ratios to the base model are this benchmark's measure.
    config = kvloom_config({"dtype": "float32"} | parse_config(args.kvloom_config), prompts, args.output_len)
    # Repeats resend the same prompts: with prefix caching on, every repeat after the first would
    # skip its prefills and measure the cache, not the adapters.
    config |= {"max_loras": max(max(counts), 1), "max_lora_rank": args.rank, "enable_prefix_caching": False}
    with tempfile.TemporaryDirectory(prefix="kvloom-bench-lora-") as tmp:
        dirs = [write_random_adapter(Path(tmp) / f"a{k}", model_config, r=args.rank, seed=k, std=0.5)
                for k in range(max(counts))]
        setups = [_Setup(bench.model_dir, config, prompts, args.output_len, dirs[:count]) for count in counts]
        # Round-robin over the engines: drift hits every count alike.
        take_turns([System(f"engine {i}", s.time_once) for i, s in enumerate(setups)], args.repeats, progress=None)
        rows = [s.result() for s in setups]
    base = next((r for r in rows if r["adapters"] == 0), None)
    print(f"\n{'adapters':>8} {'out tok/s':>10} {'best wall s':>12} {'vs base':>8}")
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        print(f"{r['adapters']:>8} {r['tokens_per_s']:>10.1f} {r['wall_s']:>12.2f} {ratio:>8}")
    if base is not None:
        for r in rows:
            if r["adapters"]:
                changed = sum(a != b for a, b in zip(r["outputs"], base["outputs"], strict=True))
                r["outputs_differ_from_base"] = changed
                print(f"{r['adapters']} adapters: {changed}/{len(r['outputs'])} outputs differ from the base model's")
    for r in rows:
        r.pop("outputs")
    write_result(args.json, {**bench.flat_envelope("lora", SCHEMA_VERSION), "rank": args.rank, "results": rows})
    return 0


if __name__ == "__main__":
    from kvloom.cli import main

    sys.exit(main(["bench", "lora", *sys.argv[1:]]))

"""``python -m kvloom bench structured``: JSON-schema constrained vs unconstrained throughput.

The same prompts run twice per backend on fresh engines (after one untimed warm-up request
that also compiles the schema, so compile time is not counted): with ``response_format`` = an
extraction schema, then unconstrained. ``--concurrency`` clients (default 32) each keep one
request in flight, closed-loop, until ``--num-requests`` are done; every request samples
(temperature 0.7, seeded) up to ``--output-len`` tokens. Each unconstrained request ignores
EOS and generates exactly as many tokens as its constrained twin did, so both runs have the
same batch shapes step by step (a constrained run whose requests stop early would otherwise
pay for a ragged tail that an all-``max_tokens`` baseline never has). The ratio is constrained
output tokens/s over unconstrained output tokens/s: the cost of grammars in a busy batch.
Constrained and unconstrained runs alternate ``--repeats`` times each and the best of each
counts (run-to-run drift here is ~10%). Also reported: the mean time per constrained step
spent in masks (``EngineStats.logits_processor_ms_per_step``, with its p99 and max), the wall
time of constrained steps (p50, p99, max), the share of constrained outputs that completed
(``stop``) and validated against the schema, and the first request on each fresh engine: its
wall time (grammar compile, first forward of each shape and all), the grammar compile's time,
and the same request again (grammar cached, prompt in the prefix cache). The unconstrained
runs' first requests show what a first request costs without a grammar.

Default checkpoint: the standard ~155M random model, with a 32,000-token byte-level BPE
tokenizer trained locally (a grammar's mask cost grows with the vocabulary).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvloom.bench.runner import header, write_result
from kvloom.bench.settings import parse_config
from kvloom.models.checkpoints import STANDARD_MODEL, ModelSpec

SCHEMA_VERSION = 1
STRUCTURED_MODEL = ModelSpec(
    "bench-llama-155m-tok32k", "v1",
    {**STANDARD_MODEL.build_kwargs, "with_tokenizer": True, "tokenizer_words": 400_000},
)
"""The standard checkpoint's architecture and weights, with a 32k-token tokenizer."""

ORDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "customer": {"type": "string", "maxLength": 24},
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "gift": {"type": "boolean"},
                },
                "required": ["sku", "quantity", "gift"],
                "additionalProperties": False,
            },
        },
        "note": {"type": "string", "maxLength": 40},
    },
    "required": ["order_id", "customer", "status", "items"],
    "additionalProperties": False,
}
"""An extraction schema: integers with bounds, bounded strings, an enum, a pattern, an array of objects."""

PROMPT_TEMPLATES = (
    "Extract the order as JSON. Order {i}: customer number {i} bought {q} items, paid by card.",
    "Customer {i} wrote: please ship my {q} boxes quickly. Return the order as JSON.",
    "Turn this message into an order record: order {i}, {q} units, status pending.",
    "Order {i} was cancelled after {q} days. Give me the JSON record.",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvloom bench structured``."""
    parser.add_argument("--model", type=Path, help="HF checkpoint dir with a tokenizer (default: a ~155M random one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32, help="requests kept in flight (closed loop)")
    parser.add_argument("--output-len", type=int, default=160, help="max_tokens of every request")
    parser.add_argument("--backends", default="xgrammar,outlines", help="comma separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each system (alternating); best kept")
    parser.add_argument("--kvloom-config", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="AsyncEngine settings, e.g. max_num_batched_tokens=1024")
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # tests: rougher ceilings


def prompts(num: int) -> list[str]:
    return [PROMPT_TEMPLATES[i % len(PROMPT_TEMPLATES)].format(i=1000 + 37 * i, q=1 + i % 9) for i in range(num)]


async def _closed_loop(model_dir: Path, config: dict[str, Any], texts: list[str], concurrency: int,
                       make_params: Any) -> dict[str, Any]:
    """Run ``texts`` with ``concurrency`` clients on a fresh engine; tokens/s, outputs, stats."""
    from kvloom import AsyncEngine

    async with AsyncEngine.from_pretrained(model_dir, **config) as engine:
        start = time.perf_counter()
        await engine.generate(texts[0], make_params(-1))  # warm-up (and compile) outside the clock
        first = time.perf_counter() - start
        compile_ms = engine.stats().grammar_compile_ms_max
        start = time.perf_counter()
        await engine.generate(texts[0], make_params(-1))  # the same request again: nothing left to compile
        again = time.perf_counter() - start
        queue = list(enumerate(texts))
        outputs: list[Any] = [None] * len(texts)

        async def client() -> None:
            while queue:
                i, text = queue.pop(0)
                outputs[i] = await engine.generate(text, make_params(i), request_id=f"r{i}")

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        stats = engine.stats()
    num_tokens = sum(len(o.token_ids) for o in outputs)
    return {"wall_s": wall, "output_tokens": num_tokens, "tokens_per_s": num_tokens / wall, "outputs": outputs,
            "mask_ms_per_step": stats.logits_processor_ms_per_step, "mask_ms_p99": stats.logits_processor_ms_p99,
            "mask_ms_max": stats.logits_processor_ms_max, "constrained_step_ms_p50": stats.constrained_step_ms_p50,
            "constrained_step_ms_p99": stats.constrained_step_ms_p99,
            "constrained_step_ms_max": stats.constrained_step_ms_max,
            "first_request_s": first, "grammar_compile_ms": compile_ms, "repeat_request_s": again}


def _validity(outputs: list[Any]) -> tuple[int, int]:
    """(completed, completed and valid) over the constrained outputs."""
    import jsonschema

    done = valid = 0
    for out in outputs:
        if out.finish_reason != "stop":
            continue
        done += 1
        try:
            jsonschema.validate(json.loads(out.text), ORDER_SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return done, valid


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the benchmark; prints a table and the ratio per backend."""
    from kvloom import SamplingParams

    command = "python -m kvloom bench structured " + shlex.join(argv[2:] if argv[:2] == ["bench", "structured"] else argv)
    info, ceilings, model_dir = header(command, args.model, args.quick, spec=STRUCTURED_MODEL)
    texts = prompts(args.num_requests)
    config = {"dtype": "float32", "max_num_seqs": max(args.concurrency, 1)} | parse_config(args.kvloom_config)
    backends = [b for b in args.backends.split(",") if b]
    print(f"model: {model_dir}\nworkload: {len(texts)} text prompts, {args.concurrency} in flight (closed loop), "
          f"max_tokens {args.output_len}, temperature 0.7 seeded; schema: ORDER_SCHEMA "
          f"(kvloom/bench/structured.py)\n")

    def constrained_params(backend: str) -> Any:
        def make(i: int) -> SamplingParams:
            return SamplingParams(temperature=0.7, seed=args.seed + i + 1, max_tokens=args.output_len,
                                  response_format=ORDER_SCHEMA, grammar_backend=backend)
        return make

    def free_params(lengths: tuple[int, ...]) -> Any:
        def make(i: int) -> SamplingParams:  # i == -1: the warm-up request
            return SamplingParams(temperature=0.7, seed=args.seed + i + 1, ignore_eos=True,
                                  max_tokens=lengths[i] if i >= 0 else args.output_len)
        return make

    def measure(make_params: Any) -> dict[str, Any]:
        return asyncio.run(_closed_loop(model_dir, config, texts, args.concurrency, make_params))

    def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
        top = max(runs, key=lambda r: r["tokens_per_s"])
        return top | {"tokens_per_s_runs": [r["tokens_per_s"] for r in runs]}

    rows: dict[str, Any] = {}
    print(f"{'system':<28} {'out tok/s':>10} {'wall s':>8} {'tokens':>8} {'mask ms/step':>13} {'stop & valid':>13}")
    for backend in backends:
        # Alternate constrained and unconstrained runs and keep each one's best: this machine's
        # speed drifts by ~10% between runs, more than the grammars cost.
        first = measure(constrained_params(backend))
        outputs = first.pop("outputs")
        lengths = tuple(len(o.token_ids) for o in outputs)  # seeded: every repeat gives the same
        constrained_runs, free_runs = [first], []
        for k in range(args.repeats):
            free_runs.append(measure(free_params(lengths)))
            if k + 1 < args.repeats:
                constrained_runs.append(measure(constrained_params(backend)))
        for run_ in constrained_runs + free_runs:
            run_.pop("outputs", None)
        res, base = best(constrained_runs), best(free_runs)
        done, valid = _validity(outputs)
        res |= {"completed": done, "valid": valid, "ratio": res["tokens_per_s"] / base["tokens_per_s"],
                "unconstrained": base,
                "sample_outputs": [{"text": o.text, "finish_reason": o.finish_reason} for o in outputs[:4]]}
        rows[backend] = res
        mask = res["mask_ms_per_step"]
        print(f"{'unconstrained, same lengths':<28} {base['tokens_per_s']:>10.1f} {base['wall_s']:>8.1f} "
              f"{base['output_tokens']:>8} {'-':>13} {'-':>13}")
        print(f"{backend + ' JSON schema':<28} {res['tokens_per_s']:>10.1f} {res['wall_s']:>8.1f} "
              f"{res['output_tokens']:>8} {mask if mask is not None else float('nan'):>13.2f} {f'{valid}/{done}':>13}",
              flush=True)
    print()
    for backend in backends:
        print(f"kvloom {backend} / unconstrained (same prompts, same lengths): {rows[backend]['ratio']:.2f}x throughput")
    for backend in backends:
        print(_first_request_line(backend, rows[backend]))
    write_result(args.json, {
        "schema_version": SCHEMA_VERSION, "bench": "structured", "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": info,
        "ceilings": ceilings, "model": str(model_dir), "num_requests": len(texts), "concurrency": args.concurrency,
        "output_len": args.output_len, "results": rows,
    })
    return 0 if all(rows[b]["valid"] == rows[b]["completed"] for b in backends) else 1


def _first_request_line(backend: str, row: dict[str, Any]) -> str:
    """Where a constrained run's time went besides throughput: its first request, its step times."""
    def num(key: str, digits: int, of: dict[str, Any] = row) -> str:
        value = of.get(key)
        return "n/a" if value is None else f"{value:.{digits}f}"

    return (f"{backend}: first request on a fresh engine {num('first_request_s', 2)} s (grammar compile "
            f"{num('grammar_compile_ms', 0)} ms; unconstrained: {num('first_request_s', 2, row['unconstrained'])} s), "
            f"the same request again {num('repeat_request_s', 2)} s; per constrained step: masks p99 "
            f"{num('mask_ms_p99', 2)} ms, max {num('mask_ms_max', 2)} ms, wall p50 {num('constrained_step_ms_p50', 1)} "
            f"ms, p99 {num('constrained_step_ms_p99', 1)} ms, max {num('constrained_step_ms_max', 1)} ms")


if __name__ == "__main__":
    from kvloom.cli import main

    sys.exit(main(["bench", "structured", *sys.argv[1:]]))

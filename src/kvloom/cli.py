"""The ``kvloom`` command line: ``kvloom demo`` and ``kvloom bench <name>``.

Every subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args, argv) -> int``; this file only wires them up. Modules are imported when the
parser is built, so they must keep heavy imports (torch, transformers) inside functions.
A new benchmark (``bench serve``, ``bench prefix``, ...) is one more entry in ``BENCHES``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

BENCHES: dict[str, tuple[str, str]] = {
    "throughput": ("kvloom.bench.throughput", "offline throughput: kvloom vs transformers on one workload"),
    "serve": ("kvloom.bench.serve", "online serving: TTFT/TPOT/E2E under Poisson arrivals, kvloom vs transformers"),
    "prefix": ("kvloom.bench.prefix", "shared prefixes (agent, RAG): prefix caching off / auto / handles vs transformers"),
    "structured": ("kvloom.bench.structured", "JSON-schema constrained vs unconstrained throughput, xgrammar and outlines"),
    "tools": ("kvloom.bench.tools", "agent workload: tool calls constrained vs the same conversations unconstrained"),
    "lora": ("kvloom.bench.lora", "throughput with 0/1/4/16 LoRA adapters in the batch, relative to the base model"),
}
"""Benchmark name -> (module, one-line help)."""


class Command(Protocol):
    """What a subcommand module provides."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace, argv: Sequence[str]) -> int: ...


def _load(module: str) -> Command:
    return cast(Command, importlib.import_module(module))


def build_parser() -> argparse.ArgumentParser:
    """The full parser; each subparser's ``command`` default is the module that runs it."""
    parser = argparse.ArgumentParser(prog="kvloom", description="kvloom: an embeddable asyncio LLM engine.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = _load("kvloom.demo")
    demo_parser = commands.add_parser("demo", help="generate a few chat answers (random weights unless --model)")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(module=demo)

    bench_parser = commands.add_parser("bench", help="benchmarks that print the machine and peers measured alongside")
    benches = bench_parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module_name, help_text) in BENCHES.items():
        module = _load(module_name)
        sub = benches.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    module = cast(Command, args.module)
    return module.run(args, args_list)


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``kvloom`` command line: ``kvloom demo``, ``kvloom eval-demo-model``, ``kvloom serve`` and ``kvloom bench <name>``.

Every subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args, argv) -> int``; this file only wires them up. Modules are imported when the
parser is built, so they must keep heavy imports (torch, transformers) inside functions.
A new benchmark (``bench serve``, ``bench prefix``, ...) is one more entry in ``BENCHES``.

Errors the user can fix (a bad ``--model``: missing directory, not a checkpoint, unsupported
architecture; a bad setting) print one line naming the problem and exit with status 1;
``kvloom --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, cast

from pydantic import ValidationError

from kvloom.errors import KvloomError

BENCHES: dict[str, tuple[str, str]] = {
    "throughput": ("kvloom.bench.throughput", "offline throughput: kvloom vs transformers on one workload"),
    "serve": ("kvloom.bench.serve", "online serving: TTFT/TPOT/E2E under Poisson arrivals, kvloom vs transformers"),
    "prefix": ("kvloom.bench.prefix", "shared prefixes (agent, RAG): prefix caching off / auto / handles vs transformers"),
    "structured": ("kvloom.bench.structured", "JSON-schema constrained vs unconstrained throughput, xgrammar and outlines"),
    "tools": ("kvloom.bench.tools", "agent workload: tool calls constrained vs the same conversations unconstrained"),
    "lora": ("kvloom.bench.lora", "throughput with 0/1/4/16 LoRA adapters in the batch, relative to the base model"),
    "single": ("kvloom.bench.single",
               "a few streams at a time: generate vs stream, float vs int8, transformers and llama.cpp's server"),
    "decode": ("kvloom.bench.decode",
               "decode throughput at several concurrencies vs transformers, against the memory-bandwidth roofline"),
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
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = _load("kvloom.demo")
    demo_parser = commands.add_parser("demo", help="generate a few chat answers (random weights unless --model)")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(module=demo)

    evaluate = _load("kvloom.demo_model.evaluate")
    eval_help = "the demo model's held-out evaluation (QA, tool calls, JSON, perplexity) through the engine"
    eval_parser = commands.add_parser("eval-demo-model", help=eval_help, description=eval_help)
    evaluate.add_arguments(eval_parser)
    eval_parser.set_defaults(module=evaluate)

    serve = _load("kvloom.serve")
    serve_help = "serve the OpenAI-compatible API over HTTP (needs the server extra)"
    serve_parser = commands.add_parser("serve", help=serve_help, description=serve_help)
    serve.add_arguments(serve_parser)
    serve_parser.set_defaults(module=serve)

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
    model = getattr(args, "model", None)
    # Before any slow set-up. A benchmark checks its own flags first (a usage error exits 2) and
    # its model in ``bench.runner.header``, before it measures the machine.
    if args.command != "bench" and isinstance(model, Path) and not model.is_dir():
        print(f"kvloom {args.command}: error: --model: {model} is not a directory", file=sys.stderr)
        return 1
    try:
        return module.run(args, args_list)
    except (KvloomError, ValidationError, FileNotFoundError, NotADirectoryError) as exc:
        if args.debug:
            raise
        print(f"kvloom {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """The error on one line: pydantic's first error as ``field: message``, else the message."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return f"{field}: {first['msg']}{more}" if field else f"{first['msg']}{more}"
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())

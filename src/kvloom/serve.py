"""``python -m kvloom serve --model DIR``: the OpenAI-compatible API over HTTP (uvicorn).

The app is ``kvloom.integrations.openai_server.create_app``; it owns its engine (loaded in the
app's lifespan, closed at shutdown). ``--adapter NAME=DIR`` (repeatable) serves a PEFT LoRA
directory under ``NAME``: clients pick it with ``model=NAME``. FastAPI and uvicorn (the
``server`` extra) are imported only when the command runs, so ``kvloom --help`` works without.

Order of work: the flags, the checkpoint's config and the engine settings are checked, then
the port is bound, and only then do the weights load; so every mistake the user can fix fails
in seconds, with one line naming it. Ctrl+C gives in-flight requests ``--shutdown-grace``
seconds, then aborts them; a second Ctrl+C aborts them at once (``server.GracefulServer``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

SERVER_EXTRA = "kvloom serve needs FastAPI and uvicorn: pip install 'kvloom[server]'"

DEFAULT_SHUTDOWN_GRACE = 10.0
"""Seconds in-flight requests get after the first Ctrl+C: most answers finish, and a restart
(a container's stop, whose SIGKILL commonly follows SIGTERM after 30 s) is not held up."""


def _adapter(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, Path(path)


def _config(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {value!r}")
    return seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kvloom serve``."""
    parser.add_argument("--model", type=Path, required=True, help="a HF checkpoint directory")
    parser.add_argument("--model-name", help="the name clients pass as `model` (default: the directory's name)")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="default 8000")
    parser.add_argument("--adapter", type=_adapter, action="append", default=[], metavar="NAME=DIR",
                        help="serve a PEFT LoRA directory under NAME (repeatable)")
    parser.add_argument("--engine", type=_config, action="append", default=[], metavar="KEY=VALUE",
                        help="an AsyncEngine.from_pretrained setting, e.g. max_num_seqs=64 or "
                             "request_timeout=30 (repeatable; values are read as JSON when they parse)")
    parser.add_argument("--shutdown-grace", type=_seconds, default=DEFAULT_SHUTDOWN_GRACE, metavar="SECONDS",
                        help="on Ctrl+C or SIGTERM, how long in-flight requests may still run before they are "
                             f"aborted (default {DEFAULT_SHUTDOWN_GRACE:g}; a second Ctrl+C aborts them at once)")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")


def build_app(args: argparse.Namespace) -> FastAPI:
    """The app ``run`` serves. The checkpoint's config and the engine settings are checked
    here (a bad one raises, naming it); the weights load in the app's lifespan."""
    try:
        from kvloom.integrations.openai_server import create_app
    except ImportError as exc:
        raise SystemExit(f"{SERVER_EXTRA} ({exc})") from exc
    from kvloom.models.config import load_model_config

    if not args.model.is_dir():
        raise FileNotFoundError(f"--model: {args.model} is not a directory")
    load_model_config(args.model)  # missing config.json, unsupported architecture
    # A bad engine setting raises here (pydantic names it): create_app configures the engine. A server
    # warms its GEMM kernels up at start (flat memory, no compile on the request path) unless told not to.
    engine = {"warmup": True, **dict(args.engine)}
    return create_app(args.model, model_name=args.model_name, adapters=dict(args.adapter), **engine)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Serve until interrupted: check everything, bind the port (a busy one raises
    ``ConfigError``), then load the model and serve; 0 after a shutdown by signal."""
    app = build_app(args)
    try:
        from kvloom.integrations.openai_server.server import GracefulServer, bind, uvicorn_config
    except ImportError as exc:
        raise SystemExit(f"{SERVER_EXTRA} ({exc})") from exc

    sock = bind(args.host, args.port)
    try:
        config = uvicorn_config(app, args.host, args.port, args.log_level, args.shutdown_grace)
        GracefulServer(config, app.state.kvloom_in_flight.abort_all, args.shutdown_grace).run(sockets=[sock])
    finally:
        sock.close()
    return 0

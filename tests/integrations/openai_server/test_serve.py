"""``kvloom serve`` and ``examples/openai_server.py``: the command's help, the app it builds
(nothing loaded before the server starts), a busy port refused before the model loads, and the
example's app mounted under a parent app whose lifespan owns the engine. (Interrupting a
running server: ``test_serve_signals.py``.)"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import httpx2
import openai
import pytest

from kvloom.cli import build_parser
from kvloom.serve import build_app
from tests.integrations.openai_server.conftest import user

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "openai_server.py"


def test_serve_help_runs_without_loading_anything() -> None:
    proc = subprocess.run([sys.executable, "-m", "kvloom", "serve", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--model" in proc.stdout and "--adapter NAME=DIR" in proc.stdout and "--port" in proc.stdout


def test_serve_builds_the_app_without_starting_it(demo_dir: Path, adapter_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--model", str(demo_dir), "--model-name", "demo",
                                      "--adapter", f"tenant={adapter_path}", "--engine", "max_num_seqs=4"])
    app = build_app(args)
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= app.openapi()["paths"].keys()
    engine = app.state.kvloom_engine
    assert engine.event_loop is None and engine.config.scheduler.max_num_seqs == 4  # loads in the lifespan


def test_serve_refuses_a_bad_engine_setting_naming_it(demo_dir: Path) -> None:
    from pydantic import ValidationError

    args = build_parser().parse_args(["serve", "--model", str(demo_dir), "--engine", "max_num_seqs=0"])
    with pytest.raises(ValidationError, match="max_num_seqs"):
        build_app(args)


@pytest.mark.asyncio
async def test_the_example_mounts_the_api_in_a_parent_app_that_owns_the_engine(demo_dir: Path) -> None:
    spec = importlib.util.spec_from_file_location("openai_server_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    app = example.mounted(demo_dir)
    async with app.router.lifespan_context(app):
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
        client = openai.AsyncOpenAI(base_url="http://test/openai/v1", api_key="unused", http_client=http)
        done = await client.chat.completions.create(model="demo", messages=user("hi"), max_tokens=2)
        assert done.usage is not None and done.usage.completion_tokens <= 2
        own = await http.get("/summarize", params={"text": "a paged KV cache"})
        assert own.status_code == 200 and "summary" in own.json()


def test_a_busy_port_fails_in_one_line_before_the_model_loads(
    demo_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from kvloom import AsyncEngine
    from kvloom.cli import main

    loads: list[str] = []

    async def start(self: AsyncEngine) -> None:
        loads.append("start")
        raise AssertionError("the model started loading before the port was checked")

    monkeypatch.setattr(AsyncEngine, "start", start)
    with socket.socket() as busy:  # another server listens there
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(demo_dir), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kvloom serve: error: --port: 127.0.0.1:{port} is already in use") and err.count("\n") == 1
    assert loads == []


def test_shutdown_grace_is_a_finite_number_of_seconds_defaulting_to_10() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m"])
    assert args.shutdown_grace == 10.0
    assert parser.parse_args(["serve", "--model", "m", "--shutdown-grace", "0.5"]).shutdown_grace == 0.5
    for bad in ("-1", "soon", "inf", "nan"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--model", "m", "--shutdown-grace", bad])

"""The examples run as a user runs them: a subprocess, no model argument, on the demo checkpoint
(``KVLOOM_CACHE_DIR`` points at a cache that already holds it). The FastAPI app is imported and
driven in-process through its lifespan, as an ASGI server would."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from kvloom import SamplingParams

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

RUNS: dict[str, tuple[str, ...]] = {
    "test_quickstart_streams_tokens_then_the_usage": ("quickstart_streaming.py",),
    "test_agent_loop_calls_a_tool_and_finds_more_in_the_cache_each_turn": ("agent_tools.py",),
    "test_rag_questions_reuse_their_documents_handle": ("rag_handles.py",),
    "test_json_extraction_prints_objects_that_validate": ("json_extraction.py",),
    "test_structured_output_example": ("structured_output.py",),
    "test_multi_lora_example": ("multi_lora.py",),
    "test_offline_batch_example_takes_a_model_dir": ("offline_batch.py", "{demo_dir}"),
    "test_loop_lag_example_keeps_the_loop_responsive": ("loop_lag.py", "--streams", "8", "--max-tokens", "8"),
}
"""Test name -> the example it runs and its command-line arguments."""


def run_example(name: str, *args: str, cache: Path) -> str:
    """Run ``examples/name`` in a fresh interpreter; its stdout, once it exited with 0."""
    # One torch thread each: two examples share the cores (see ``started``), and threads that
    # spin-wait for a busy core cost a tiny model more than they bring (about 3x the CPU time).
    env = {**os.environ, "KVLOOM_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def started(request: pytest.FixtureRequest, demo_cache: Path) -> Iterator[dict[str, Future[str]]]:
    """The examples of this module's selected tests, all started at once, two at a time: each
    is a fresh interpreter that spends seconds importing torch, so two side by side roughly
    halve the wait on a 2-core machine. Each test then checks its own example's output."""
    from kvloom.demo import DEMO_MODEL

    demo_dir = str(demo_cache / "models" / DEMO_MODEL.cache_key)  # for the one example given a MODEL_DIR
    selected = {item.name for item in request.session.items if item.module is request.module}
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {test: pool.submit(run_example, *(a.format(demo_dir=demo_dir) for a in args), cache=demo_cache)
               for test, args in RUNS.items() if test in selected}


@pytest.fixture
def stdout(started: dict[str, Future[str]], request: pytest.FixtureRequest) -> str:
    """The stdout of the example this test checks (see ``RUNS``)."""
    return started[request.node.name].result()


def load_example(name: str) -> ModuleType:
    """Import an example file as a module (``examples/`` is not a package)."""
    module_name = f"example_{Path(name).stem}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # pydantic resolves the module's annotations through it
    spec.loader.exec_module(module)
    return module


def ints(pattern: str, text: str) -> list[int]:
    return [int(x) for x in re.findall(pattern, text, re.M)]


@pytest.mark.usefixtures("started")  # the subprocesses run meanwhile
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_fastapi_sse_streams_what_generate_returns(demo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(demo_cache))  # create_app() without a model: the demo
    app = load_example("fastapi_sse.py").create_app()
    messages = [{"role": "user", "content": "Hello there"}]
    async with app.router.lifespan_context(app):
        expected = await app.state.engine.generate(messages=messages,
                                                   params=SamplingParams(temperature=0.0, max_tokens=12))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            body = {"messages": messages, "max_tokens": 12, "temperature": 0.0}
            async with client.stream("POST", "/chat", json=body) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
            too_long = await client.post("/chat", json={"messages": [{"role": "user", "content": "a " * 3000}]})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == expected.text
    assert chunks[-1]["finish_reason"] == expected.finish_reason
    assert chunks[-1]["usage"]["completion_tokens"] == len(expected.token_ids)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert too_long.status_code == 400 and "prompt" in too_long.json()["detail"], too_long.text


def test_quickstart_streams_tokens_then_the_usage(stdout: str) -> None:
    assert stdout.startswith("assistant: "), stdout
    (chunks,) = ints(r"^chunks: (\d+), finish_reason: (?:stop|length)$", stdout)
    (prompt, completion) = re.findall(r"^usage: prompt_tokens=(\d+) completion_tokens=(\d+) ", stdout, re.M)[0]
    assert int(prompt) > 10 and 1 <= int(completion) <= 48
    assert 2 <= chunks <= int(completion), stdout  # streamed piece by piece, not in one final chunk


def test_agent_loop_calls_a_tool_and_finds_more_in_the_cache_each_turn(stdout: str) -> None:
    (pinned,) = ints(r"^system prompt \+ tools: \d+ tokens, (\d+) pinned$", stdout)
    call = re.search(r"^turn 1: call (get_weather|find_hotels)\((\{.*\})\)$", stdout, re.M)
    assert call, stdout
    assert "city" in json.loads(call[2])  # the arguments parse and hold the required field
    assert re.search(r"^  tool result: [\[{]", stdout, re.M), stdout
    assert re.search(r"^turn 2: answer ", stdout, re.M) and re.search(r"^turn 3: (answer|call) ", stdout, re.M), stdout
    reasons = re.findall(r"finish_reason=(\w+)", stdout)
    assert reasons[0] == "tool_calls" and reasons[1] in ("stop", "length"), reasons
    cached = ints(r"cached_tokens=(\d+)", stdout)
    assert len(cached) == 3 and pinned <= cached[0] < cached[1] < cached[2], cached
    assert "prefix handle used by 3 requests" in stdout


def test_rag_questions_reuse_their_documents_handle(stdout: str) -> None:
    pinned = dict(re.findall(r"^cached (\w+): \d+ tokens, (\d+) in \d+ pinned blocks$", stdout, re.M))
    assert set(pinned) == {"refunds", "shipping"}, stdout
    questions = re.findall(r"^\[(\w+)\] .+\? -> cached (\d+) of (\d+) prompt tokens; answer ", stdout, re.M)
    assert len(questions) == 4, stdout
    for doc, cached, prompt in questions:
        assert int(pinned[doc]) <= int(cached) < int(prompt)  # the whole document from the cache
    assert re.findall(r"^live handles: (\d+)$", stdout, re.M) == ["2", "0"]
    assert len(re.findall(r"^released prefix-\S+ after 2 questions$", stdout, re.M)) == 2


def test_json_extraction_prints_objects_that_validate(stdout: str) -> None:
    contact = load_example("json_extraction.py").Contact
    objects = re.findall(r"^json: +(.*)$", stdout, re.M)
    assert len(objects) == 3 and "cut at max_tokens" not in stdout, stdout
    for text in objects:
        contact.model_validate_json(text)


def test_structured_output_example(stdout: str) -> None:
    assert re.search(r"^sku: +[A-Z]{3}-\d{4}$", stdout, re.M), stdout
    assert re.search(r"^answer: (yes|no)$", stdout, re.M), stdout
    assert re.search(r"^ticket: title=.* priority='(low|medium|high)' estimate_hours=\d+$", stdout, re.M), stdout


def test_multi_lora_example(stdout: str) -> None:
    assert "loaded: tenant-0 (rank 8), tenant-1 (rank 8)" in stdout
    lines = dict(re.findall(r"^ *(base model|tenant-\d): (.*)$", stdout, re.M))
    assert set(lines) == {"base model", "tenant-0", "tenant-1"}
    assert len(set(lines.values())) == 3, lines  # each adapter changes the output


def test_offline_batch_example_takes_a_model_dir(stdout: str) -> None:
    assert stdout.count("tokens]") == 3
    assert re.findall(r"^(\d) '", stdout, re.M) == ["0", "1"]  # n=2 seeded choices


def test_loop_lag_example_keeps_the_loop_responsive(stdout: str) -> None:
    match = re.search(r"^8 streams x 8 tokens in [\d.]+ s; 5 ms ticker lag over (\d+) ticks: p50 ([\d.]+) ms", stdout)
    assert match, stdout
    assert int(match[1]) > 10 and float(match[2]) < 100, stdout  # a blocked loop would lag by whole steps

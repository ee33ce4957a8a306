"""Load and failures: a full queue is a 429; a client that leaves aborts its request (the engine
frees its KV); a failure mid-stream is one SSE error event, then ``[DONE]``.

Each test serves its own small engine (one running sequence, one waiting) with ``create_app``
given the started engine; the raw ASGI calls see the stream chunk by chunk, as a server does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import openai
import pytest
import pytest_asyncio
from fastapi import FastAPI

from kvloom import AsyncEngine, SamplingParams
from kvloom.integrations.openai_server import create_app
from tests.engine.helpers import assert_settles_idle
from tests.integrations.openai_server.conftest import client_for, user

pytestmark = pytest.mark.asyncio(loop_scope="package")

LONG = {"model": "demo", "messages": user("Tell me everything."), "max_tokens": 2000, "ignore_eos": True}
"""A request that would run for a minute: it only ends early when aborted."""


@pytest_asyncio.fixture(loop_scope="package")
async def small(demo_dir: Path) -> AsyncIterator[tuple[AsyncEngine, FastAPI]]:
    engine = AsyncEngine.from_pretrained(demo_dir, max_num_seqs=1, max_waiting=1)
    await engine.start()
    try:
        yield engine, create_app(engine, model_name="demo")  # a shared engine: no lifespan needed
    finally:
        await engine.aclose()


async def until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(30):
        while not condition():
            await anyio.sleep(0.01)


async def call_asgi(app: FastAPI, body: dict[str, Any], on_chunk: Callable[[int], None],
                    disconnected: anyio.Event) -> tuple[int, str]:
    """POST ``body`` to ``/v1/chat/completions`` as a server would; ``on_chunk(i)`` runs as the
    i-th body chunk is sent; the client "leaves" when ``disconnected`` is set."""
    status, parts, sent = 0, [], False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message.get("body"):
            parts.append(message["body"].decode())
            on_chunk(len(parts))

    path = "/v1/chat/completions"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    await app(scope, receive, send)  # type: ignore[arg-type]
    return status, "".join(parts)


async def test_a_full_queue_is_a_429(small: tuple[AsyncEngine, FastAPI]) -> None:
    engine, app = small
    params = SamplingParams(max_tokens=2000, ignore_eos=True)
    running = engine.stream("a", params)
    await anext(running)  # it runs in the one slot: the next one waits
    waiting = engine.stream("b", params, request_id="waiting")
    try:
        await until(lambda: engine.stats().num_waiting == 1)
        with pytest.raises(openai.RateLimitError) as err:
            await client_for(app).chat.completions.create(model="demo", messages=user("hi"), max_tokens=2)
        assert err.value.status_code == 429
        assert err.value.body["type"] == "rate_limit_error"  # type: ignore[index]
        assert err.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    finally:
        await running.aclose()  # type: ignore[attr-defined]
        engine.abort("waiting")  # never iterated: closing it would not reach the engine
        del waiting
    await assert_settles_idle(engine)


@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_that_leaves_aborts_its_request(small: tuple[AsyncEngine, FastAPI], stream: bool) -> None:
    engine, app = small
    left = anyio.Event()
    if stream:  # leave after the second chunk
        status, text = await call_asgi(app, {**LONG, "stream": True}, lambda i: left.set() if i == 2 else None, left)
        assert status == 200 and text.count("data: ") >= 2 and "[DONE]" not in text
    else:  # leave while the answer is being generated
        async def leave() -> None:
            await until(lambda: engine.stats().num_running == 1)
            left.set()

        task = asyncio.ensure_future(leave())
        status, text = await call_asgi(app, LONG, lambda i: None, left)
        await task
        assert status == 499 and text == ""
    await assert_settles_idle(engine)  # aborted: its 2000 tokens would take far longer than the settle timeout


async def test_a_failure_mid_stream_is_an_sse_error_then_done(small: tuple[AsyncEngine, FastAPI]) -> None:
    engine, app = small
    closing: list[asyncio.Task[None]] = []

    def close_engine(i: int) -> None:  # the engine goes away while the answer streams
        if i == 2:
            closing.append(asyncio.ensure_future(engine.aclose()))

    status, text = await call_asgi(app, {**LONG, "stream": True}, close_engine, anyio.Event())
    await closing[0]
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert status == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_unavailable" and error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])


@pytest.mark.parametrize("stream", [True, False])
async def test_aborting_the_in_flight_requests_ends_them_cleanly(small: tuple[AsyncEngine, FastAPI], stream: bool) -> None:
    """What a server shutting down does after its grace period: each answer ends as an abort
    (a stream with its last chunk and ``[DONE]``, a waiting request with a 200), not a cut."""
    engine, app = small
    in_flight = app.state.kvloom_in_flight
    aborted: list[int] = []
    if stream:  # abort after the second chunk
        status, text = await call_asgi(app, {**LONG, "stream": True},
                                       lambda i: aborted.append(in_flight.abort_all()) if i == 2 else None,
                                       anyio.Event())
        events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
        assert status == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
    else:  # abort while the answer is being generated
        async def abort() -> None:
            await until(lambda: engine.stats().num_running == 1)
            aborted.append(in_flight.abort_all())

        task = asyncio.ensure_future(abort())
        status, text = await call_asgi(app, LONG, lambda i: None, anyio.Event())
        await task
        assert status == 200 and json.loads(text)["choices"][0]["finish_reason"] == "abort"
    assert aborted == [1] and in_flight.request_ids() == []
    await assert_settles_idle(engine)  # aborted: its 2000 tokens would take far longer than the settle timeout

"""The OpenAI app (``create_app``) served by uvicorn on 127.0.0.1, as ``kvloom serve`` serves it, read
by an HTTP client over a real connection as raw server-sent events: what a stream carries is what
``AsyncEngine.generate`` returns for the same request, framed as SSE (``text/event-stream``, one
``data:`` line per event, ``data: [DONE]`` last), and a client that closes its connection mid-stream
makes the app leave the kvloom stream, which aborts the request and frees its KV blocks.

(The same app in-process, through the official client: test_chat.py; raw ASGI disconnects and
failures mid-stream: test_overload.py.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import pytest_asyncio
import uvicorn
from fastapi import FastAPI

from kvloom import AsyncEngine, SamplingParams, StreamChunk
from kvloom.integrations.openai_server import create_app
from kvloom.integrations.openai_server.server import bind
from tests.engine.helpers import SETTLE_TIMEOUT_S
from tests.integrations.openai_server.conftest import user

pytestmark = pytest.mark.asyncio(loop_scope="module")

STARTUP_S = 120.0
"""How long the server may take to load the demo model and listen (2 busy CPUs)."""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(demo_dir: Path) -> AsyncIterator[tuple[str, FastAPI]]:
    """The app, which owns its engine (its lifespan starts and closes it), served by uvicorn on a
    free port of 127.0.0.1 on this module's event loop; yields its base URL and the app."""
    app = create_app(demo_dir, model_name="demo")
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        with anyio.fail_after(STARTUP_S):
            while not server.started:
                if task.done():
                    task.result()  # the server failed to start: its error
                    pytest.fail("the server exited before it started")
                await asyncio.sleep(0.01)
        host, port = sock.getsockname()[:2]
        yield f"http://{host}:{port}", app
    finally:
        server.should_exit = True
        await task
        sock.close()


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The data of each server-sent event, checking the framing: every line is ``data: ...`` and
    every event ends with a blank line."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line:
            field, _, value = line.partition(": ")
            assert field == "data", f"not a data line: {line!r}"
            data.append(value)
        elif data:
            yield "\n".join(data)
            data = []
    assert not data, "the last event was not ended by a blank line"


async def test_a_stream_over_http_carries_what_generate_returns(served: tuple[str, FastAPI]) -> None:
    url, app = served
    engine: AsyncEngine = app.state.kvloom_engine
    messages = user("Describe the paged KV cache of an inference engine.")
    # Different cache salts: each request computes its whole prompt (no prefix-cache hit whose
    # other code path could change a logprob in its last bits), so both run exactly the same steps.
    expected = await engine.generate(messages=messages, cache_salt="direct", params=SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0))
    body = {"model": "demo", "messages": messages, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "stream": True, "stream_options": {"include_usage": True}, "cache_salt": "http"}
    async with (
        httpx.AsyncClient(base_url=url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [event async for event in sse_data(response)]
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = [json.loads(event) for event in events[:-1]]
    deltas = [chunk["choices"][0] for chunk in chunks]
    assert "".join(d["delta"].get("content") or "" for d in deltas) == expected.text
    assert [d["finish_reason"] for d in deltas][-1] == expected.finish_reason == "length"
    assert all(d["finish_reason"] is None for d in deltas[:-1])
    # Token by token: each streamed token's logprob is the one generate gave that token.
    streamed = [entry["logprob"] for d in deltas if d.get("logprobs") for entry in d["logprobs"]["content"]]
    assert expected.logprobs is not None
    assert streamed == pytest.approx([lp.logprob for lp in expected.logprobs], rel=0, abs=1e-6)
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (expected.usage.prompt_tokens, 12)


async def test_a_client_closing_its_connection_mid_stream_aborts_the_request(
    served: tuple[str, FastAPI], monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, app = served
    engine: AsyncEngine = app.state.kvloom_engine
    # How each kvloom stream the app opens ends: run to its last chunk, or left early (closed, or
    # its reader cancelled).
    ends: list[tuple[str, list[StreamChunk]]] = []
    open_stream = engine.stream

    def tapped_stream(*args: Any, **kwargs: Any) -> AsyncIterator[StreamChunk]:
        inner = open_stream(*args, **kwargs)

        async def tap() -> AsyncIterator[StreamChunk]:
            chunks: list[StreamChunk] = []
            ran_to_its_end = False
            try:
                async for chunk in inner:
                    chunks.append(chunk)
                    yield chunk
                ran_to_its_end = True
            finally:
                ends.append(("ran to its end" if ran_to_its_end else "left early", chunks))
                await inner.aclose()  # type: ignore[attr-defined]

        return tap()

    monkeypatch.setattr(engine, "stream", tapped_stream)
    # 2,000 tokens: minutes on this model; it ends in time only if the disconnect aborts it.
    body = {"model": "demo", "messages": user("Tell me everything."), "max_tokens": 2000, "ignore_eos": True,
            "stream": True}
    async with (
        httpx.AsyncClient(base_url=url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        events = sse_data(response)
        for _ in range(3):  # the role chunk, then content
            assert "choices" in json.loads(await anext(events))
        await events.aclose()  # type: ignore[attr-defined]
        # Leaving the block closes the response mid-body: httpx drops the connection.
    await engine.wait_idle(timeout=SETTLE_TIMEOUT_S)
    engine.assert_idle()  # no request, every KV block free
    assert app.state.kvloom_in_flight.request_ids() == []
    assert len(ends) == 1
    how, chunks = ends[0]
    assert how == "left early", "the app kept reading the kvloom stream after its client left"
    assert 2 <= sum(len(c.token_ids) for c in chunks) < 2000 and chunks[-1].finish_reason is None

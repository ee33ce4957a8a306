"""A FastAPI app streaming server-sent events from an AsyncEngine, driven in-process by httpx."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi
import httpx
import pytest
from fastapi.responses import StreamingResponse

from kvloom import AsyncEngine, SamplingParams

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_app(engine: AsyncEngine) -> fastapi.FastAPI:
    @asynccontextmanager
    async def lifespan(app: fastapi.FastAPI) -> AsyncIterator[None]:
        await engine.start()
        yield
        await engine.aclose()

    app = fastapi.FastAPI(lifespan=lifespan)

    @app.get("/generate")
    async def generate(prompt: str, max_tokens: int = 8) -> StreamingResponse:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

        async def events() -> AsyncIterator[str]:
            async for chunk in engine.stream(prompt, params):
                yield f"data: {json.dumps({'text': chunk.text, 'token_ids': chunk.token_ids})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


async def test_sse_stream_carries_the_same_tokens_as_generate(llama_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(llama_dir)
    app = make_app(engine)
    async with app.router.lifespan_context(app):
        expected = await engine.generate("Hello world", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
            client.stream("GET", "/generate", params={"prompt": "Hello world"}) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [t for c in chunks for t in c["token_ids"]] == expected.token_ids
    assert "".join(c["text"] for c in chunks) == expected.text

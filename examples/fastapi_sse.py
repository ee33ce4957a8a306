"""A FastAPI app that streams chat completions as server-sent events (SSE), engine in the lifespan.

Run:  python examples/fastapi_sse.py [--model DIR] [--port 8000]
Then: curl -N localhost:8000/chat -H 'content-type: application/json' \\
           -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'
Each event is ``data: {"text", "finish_reason", "usage"}``; the last one is ``data: [DONE]``
(or an ``event: error`` if the request fails once streaming has begun).
Or import it: ``uvicorn.run(create_app(model_dir))``. Without --model it uses the demo
model (5M parameters, trained on a
synthetic corpus: general questions get simple, often nonsensical answers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from kvloom import AsyncEngine, InvalidRequestError, KvloomError, SamplingParams
from kvloom.demo import demo_model_dir


class ChatRequest(BaseModel):
    messages: list[dict[str, str]] = Field(min_length=1)
    max_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = Field(0.7, ge=0.0)


def create_app(model_dir: str | Path | None = None) -> FastAPI:
    """The app; its engine starts (weights load off the event loop) and stops with the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncEngine.from_pretrained(model_dir or demo_model_dir()) as engine:
            app.state.engine = engine
            yield

    app = FastAPI(title="kvloom SSE example", lifespan=lifespan)

    @app.post("/chat")
    async def chat(body: ChatRequest, request: Request) -> StreamingResponse:
        engine: AsyncEngine = request.app.state.engine
        params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature)
        try:  # bad input raises here, before anything is queued: answer 400, not a broken stream
            stream = engine.stream(messages=body.messages, params=params)
        except InvalidRequestError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc

        async def events() -> AsyncIterator[str]:
            # A client that disconnects cancels this generator; leaving the ``async for`` aborts
            # the request and frees its KV blocks within one engine step.
            try:
                async for chunk in stream:
                    usage = dataclasses.asdict(chunk.usage) if chunk.usage is not None else None
                    payload = {"text": chunk.text, "finish_reason": chunk.finish_reason, "usage": usage}
                    yield f"data: {json.dumps(payload)}\n\n"
            except KvloomError as exc:  # after the headers went out (a deadline, a very long prompt)
                yield f"event: error\ndata: {json.dumps({'error': str(exc)})}\n\n"
                return
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser(description="Stream chat completions as server-sent events.")
    parser.add_argument("--model", help="a HF checkpoint directory (default: the demo model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host=args.host, port=args.port)

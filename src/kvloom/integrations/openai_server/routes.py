"""The endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ``/health``.

Each handler checks the body (``check_fields``), resolves ``model`` (the base model or a loaded
LoRA adapter), turns the body into kvloom arguments and either waits for the completion or
streams it; the request is in ``Served.in_flight`` until its answer is sent or its stream
closed. Errors are raised and answered by ``errors.install_handlers``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from kvloom.engine.async_engine import AsyncEngine
from kvloom.errors import InvalidRequestError
from kvloom.integrations.openai_server.convert import (
    ChunkWriter,
    ResponseMeta,
    chat_completion,
    text_completion,
)
from kvloom.integrations.openai_server.errors import (
    OpenAIError,
    error_response,
    from_exception,
    model_not_found,
)
from kvloom.integrations.openai_server.inflight import InFlight
from kvloom.integrations.openai_server.sampling import (
    chat_params,
    chat_tools,
    client_names,
    completion_params,
)
from kvloom.integrations.openai_server.schemas import BaseRequest, ChatCompletionRequest, CompletionRequest
from kvloom.integrations.openai_server.streaming import ClientDisconnected, race_disconnect, sse_events

CLIENT_CLOSED = 499
"""The status logged for a request whose client left (nobody reads the response)."""


@dataclass(slots=True)
class Served:
    """The engine behind the app, the name its base model is served under, and the requests
    being answered."""

    engine: AsyncEngine
    model_name: str
    created: int
    in_flight: InFlight = field(init=False)

    def __post_init__(self) -> None:
        self.in_flight = InFlight(self.engine)

    def ready_engine(self) -> AsyncEngine:
        """The engine, once started on this event loop (the app's lifespan, or its owner's, starts it)."""
        engine = self.engine
        if engine.event_loop is None:
            raise OpenAIError(503, "The engine is not started: run the app with its lifespan, or start the engine "
                                   "in your own app's lifespan", type="server_error", code="engine_unavailable")
        if engine.event_loop is not asyncio.get_running_loop():
            raise OpenAIError(500, "The engine runs on another event loop than this app: start it in the app's "
                                   "lifespan", type="server_error")
        return engine

    def model_names(self) -> list[str]:
        return [self.model_name, *(a.name for a in self.engine.adapters())]

    def adapter_for(self, model: str) -> str | None:
        """None for the base model, else the adapter ``model`` names; 404 for anything else."""
        if model == self.model_name:
            return None
        if model in {a.name for a in self.engine.adapters()}:
            return model
        raise model_not_found(model, self.model_names())

    def model_card(self, name: str) -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "kvloom"}
        if name != self.model_name:
            card["parent"] = self.model_name
        return card


def _meta(prefix: str, model: str) -> ResponseMeta:
    return ResponseMeta(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)


async def _answer(request: Request, served: Served, body: BaseRequest, chat: bool, args: dict[str, Any]) -> Response:
    """Run or stream one request; ``args`` go to ``generate``/``stream``."""
    engine = served.ready_engine()
    meta = _meta("chatcmpl" if chat else "cmpl", body.model)
    args = {**args, "request_id": meta.id, "adapter": served.adapter_for(body.model), "cache_salt": body.cache_salt}
    ticket = served.in_flight.start(meta.id)
    streaming = False
    try:
        if not body.stream:
            completion = await race_disconnect(request, lambda: engine.generate(**args))
            convert = chat_completion if chat else text_completion
            return Response(_dumps(convert(completion, meta, engine.tokenizer)), media_type="application/json")
        stream = engine.stream(**args)
        first = await race_disconnect(request, lambda: anext(stream, None))
        writer = ChunkWriter(meta, chat, body.include_usage, engine.tokenizer)
        events = sse_events(first, stream, writer, on_close=functools.partial(served.in_flight.finish, ticket))
        streaming = True  # the events' generator finishes the ticket when it closes
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    except InvalidRequestError as exc:  # named as the client named it (max_completion_tokens, ...)
        raise from_exception(exc, client_names(body)) from exc
    finally:
        if not streaming:
            served.in_flight.finish(ticket)


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def build_router(served: Served) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The base model and every loaded LoRA adapter."""
        return {"object": "list", "data": [served.model_card(name) for name in served.model_names()]}

    @router.get("/v1/models/{model}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        served.adapter_for(model)
        return served.model_card(model)

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        body.check_fields()
        args = {"messages": body.template_messages(), "params": chat_params(body), **chat_tools(body)}
        return await _answer(request, served, body, True, args)

    @router.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        body.check_fields()
        args = {"prompt": body.single_prompt(), "params": completion_params(body)}
        return await _answer(request, served, body, False, args)

    @router.get("/health", response_model=None)
    async def health() -> Response:
        """200 (empty) while the engine serves; 503 (an OpenAI error body) before it started and
        once it failed or closed."""
        if served.engine.event_loop is not None and served.engine.stats().healthy:
            return Response(status_code=200)
        return error_response(OpenAIError(503, "The engine is not serving (not started, failed or closed)",
                                          type="server_error", code="engine_unavailable"))

    return router

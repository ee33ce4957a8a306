"""Streaming and disconnects: server-sent events from a kvloom stream, and work that stops
when the client leaves.

A stream is answered with HTTP 200 only once its first chunk exists, so anything that fails
before (bad input, overload, a timeout in the queue) gets its own status and error body.
After that a failure is one SSE error event, then ``data: [DONE]``. A client that leaves
aborts its request: before the first chunk ``race_disconnect`` cancels the wait; while
streaming, Starlette cancels the body iterator, whose ``finally`` closes the kvloom stream,
and kvloom frees the request's KV blocks within one step.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request

from kvloom.integrations.openai_server.convert import ChunkWriter
from kvloom.integrations.openai_server.errors import from_exception, sse_error
from kvloom.outputs import StreamChunk

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The client left before the answer was ready; its request was aborted."""


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def race_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """``await work()``, cancelled (and ``ClientDisconnected`` raised) if the client leaves first.
    ``work``'s own exception propagates as is."""
    outcome: list[Any] = []

    async def run(scope: anyio.CancelScope) -> None:
        try:
            outcome.append(("ok", await work()))
        except Exception as exc:
            outcome.append(("error", exc))
        scope.cancel()

    async def watch(scope: anyio.CancelScope) -> None:
        await _wait_disconnect(request)
        scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(run, group.cancel_scope)
        group.start_soon(watch, group.cancel_scope)
    if not outcome:
        raise ClientDisconnected
    kind, value = outcome[0]
    if kind == "error":
        raise value
    result: T = value
    return result


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def sse_events(first: StreamChunk | None, rest: AsyncIterator[StreamChunk], writer: ChunkWriter,
                     on_close: Callable[[], None] = lambda: None) -> AsyncIterator[str]:
    """``first`` and then the rest of the stream as SSE ``data:`` events; the usage chunk when
    asked for; ``data: [DONE]`` last, also after a failure (sent as an error event).
    ``on_close`` runs once the kvloom stream is closed, however the events end."""
    try:
        piece = first
        while piece is not None:
            chunk = writer.chunk(piece)
            if chunk is not None:
                yield _event(chunk)
            if piece.usage is not None and writer.include_usage:
                yield _event(writer.usage_chunk(piece.usage))
            piece = await anext(rest, None)
    except Exception as exc:
        yield sse_error(from_exception(exc))
    finally:
        try:
            await rest.aclose()  # type: ignore[attr-defined]
        finally:
            on_close()
    yield DONE

"""Event-loop side of one request: a buffer the engine loop fills and the consumer drains.

The engine never waits on a consumer: the loop appends deltas and sets an event. A slow
consumer finds several deltas waiting and gets them merged into one chunk (per choice), so its
buffer holds at most the request's own tokens and never holds anyone else up. Loop-thread
only: nothing here is touched from another thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from kvloom.outputs import Completion, StreamChunk, ToolCallDelta, Usage


@dataclass(slots=True, eq=False)
class RequestStream:
    """One request's buffer. Once ``finished``, nothing more is pushed; the consumer drains
    ``pending`` and then raises ``error`` if set (chunks delivered before an error are kept)."""

    request_id: str
    pending: list[StreamChunk] = field(default_factory=list)
    event: anyio.Event = field(default_factory=anyio.Event)
    finished: bool = False
    error: BaseException | None = None
    completion: Completion | None = None

    def push(self, chunk: StreamChunk) -> None:
        self.pending.append(chunk)
        self.event.set()

    def finish(self, completion: Completion | None, usage: Usage | None) -> None:
        """The request is done; the last pending chunk carries its usage."""
        self.completion = completion
        if usage is not None:
            if self.pending:
                self.pending[-1].usage = usage
            else:
                self.pending.append(StreamChunk(self.request_id, 0, "", [], None, None, usage))
        self.finished = True
        self.event.set()

    def fail(self, error: BaseException, partial: Completion | None = None) -> None:
        """End with ``error``, after the chunks already pending (``partial``: what it produced)."""
        if not self.finished:
            self.completion = partial
            self.error = error
            self.finished = True
            self.event.set()

    def take(self) -> list[StreamChunk]:
        """Everything pending, merged per choice index (consecutive deltas of one choice join)."""
        chunks, self.pending = self.pending, []
        merged: list[StreamChunk] = []
        for chunk in chunks:
            last = merged[-1] if merged else None
            if last is not None and last.index == chunk.index and last.finish_reason is None:
                last.text += chunk.text
                last.token_ids.extend(chunk.token_ids)
                if chunk.logprobs:
                    last.logprobs = (last.logprobs or []) + chunk.logprobs
                last.finish_reason = chunk.finish_reason
                last.usage = chunk.usage
                if chunk.tool_calls:
                    last.tool_calls = merge_tool_deltas(last.tool_calls or [], chunk.tool_calls)
            else:
                merged.append(chunk)
        return merged

    async def wait(self) -> None:
        """Until something is pending or the request ended. Loop-side only (no await between
        the check and the wait, so a push cannot slip between them)."""
        if self.pending or self.finished:
            return
        self.event = anyio.Event()
        await self.event.wait()


async def iterate(
    stream: RequestStream | None, abort: Callable[[RequestStream], None],
    setup: Callable[[], Awaitable[RequestStream]] | None = None,
) -> AsyncIterator[StreamChunk]:
    """Drain ``stream`` (or the one ``setup`` submits, on the first iteration): its chunks,
    then its error if it failed. Leaving early (break, cancellation, ``aclose``) calls
    ``abort`` on a stream that has not finished."""
    if stream is None:
        assert setup is not None
        stream = await setup()
    try:
        while True:
            await stream.wait()
            for chunk in stream.take():
                yield chunk
            if stream.finished and not stream.pending:
                if stream.error is not None:
                    raise stream.error
                return
    finally:
        if not stream.finished:
            abort(stream)


def merge_tool_deltas(first: list[ToolCallDelta], then: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Join consecutive pieces of one call (argument fragments append to the piece before; a
    piece marked ``incomplete`` marks the joined one)."""
    merged = [ToolCallDelta(d.index, d.id, d.name, d.arguments, d.incomplete) for d in first]
    for d in then:
        if merged and merged[-1].index == d.index and d.id is None and d.name is None:
            merged[-1].arguments += d.arguments
            merged[-1].incomplete = merged[-1].incomplete or d.incomplete
        else:
            merged.append(ToolCallDelta(d.index, d.id, d.name, d.arguments, d.incomplete))
    return merged

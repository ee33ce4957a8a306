"""``EngineRuntime``: one ``AsyncEngine`` callable from any thread and any asyncio loop.

Framework adapters (LangChain, LlamaIndex) are called four ways: ``await`` from the app's
loop, ``await`` from some other loop (a test's, a worker's), plain sync calls from a script,
and sync calls from inside a running loop (a notebook, a sync tool inside an async agent).
An ``AsyncEngine`` lives on the asyncio loop that started it; this class routes each call:

- async, on the engine's loop: straight to the engine;
- async, on another loop: the coroutine runs on the engine's loop
  (``run_coroutine_threadsafe``) and the caller awaits it without blocking its own loop;
  streams cross over chunk by chunk;
- sync, on any thread but the engine loop's: submitted to the engine's loop and waited on;
- sync, on the engine loop's own thread: refused with ``RuntimeError`` (waiting there would
  deadlock the loop the engine needs); use the async method.

Built from a model directory, the runtime owns its engine: it starts it on a daemon thread
with its own loop at the first call (construction loads nothing), and ``close()`` (or
garbage collection) stops both. Built from a started engine, it only routes calls; the
engine stays the caller's to close. An engine given before it was started is started on the
runtime's own thread at the first call.

Leaving a stream early, cancelling the awaiting task or closing a sync iterator aborts the
request on the engine's loop, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kvloom.engine.async_engine import AsyncEngine
from kvloom.errors import EngineClosedError
from kvloom.outputs import Completion, StreamChunk

T = TypeVar("T")

SAME_LOOP_SYNC_CALL = (
    "a synchronous call from the event loop that runs the engine would deadlock it: await the async "
    "method instead (ainvoke, astream, acomplete, ...), or let the adapter own its engine "
    "(pass a model directory) so that it runs on its own thread"
)

_END = object()


class _Owned:
    """The thread and loop a model-directory runtime starts its engine on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="kvloom-runtime", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def stop(self, engine: AsyncEngine | None) -> None:
        """Close ``engine`` on the loop, then stop the loop and join the thread (idempotent)."""
        if self.loop.is_closed():
            return
        if engine is not None and self.loop.is_running():
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                asyncio.run_coroutine_threadsafe(engine.aclose(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=60)
            self.loop.close()


class EngineRuntime:
    """Routes generate / stream calls to one ``AsyncEngine`` from any thread or loop (see module doc).

    ``EngineRuntime(model_dir, **config)`` (config as ``AsyncEngine.from_pretrained``) owns a
    lazily started engine; ``EngineRuntime(engine=engine)`` shares one.
    """

    def __init__(self, model: str | Path | None = None, *, engine: AsyncEngine | None = None,
                 **config: Any) -> None:
        if (model is None) == (engine is None):
            raise ValueError("EngineRuntime: pass a model directory or an engine=, not both")
        if engine is not None and config:
            raise ValueError(f"EngineRuntime: engine settings ({', '.join(sorted(config))}) go to the engine, "
                             "not to a runtime that shares one")
        self._model = Path(model) if model is not None else None
        self._config = config
        self._engine = engine
        self._owned: _Owned | None = None
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize[Any, EngineRuntime] | None = None

    # ---- the engine and its loop ----------------------------------------------------------
    @property
    def engine(self) -> AsyncEngine | None:
        """The engine, once there is one (a model-directory runtime makes it at the first call)."""
        return self._engine

    @property
    def model_dir(self) -> Path:
        """The checkpoint directory the engine serves."""
        if self._engine is not None:
            return Path(self._engine.config.model)
        assert self._model is not None
        return self._model

    def _loop_and_engine(self) -> tuple[asyncio.AbstractEventLoop, AsyncEngine]:
        """The engine and the loop it runs on, starting them on the runtime's thread if needed."""
        engine = self._engine
        if engine is not None and engine.event_loop is not None:
            loop = engine.event_loop
            if loop.is_closed() or not loop.is_running():
                raise EngineClosedError("the event loop that runs this engine is closed or stopped; start the "
                                        "engine on a loop that keeps running, or pass a model directory")
            return loop, engine
        with self._lock:
            if self._owned is None:
                if self._engine is None:
                    assert self._model is not None
                    self._engine = AsyncEngine.from_pretrained(self._model, **self._config)
                self._owned = _Owned()
                self._finalizer = weakref.finalize(self, self._owned.stop, self._engine)
            owned, engine = self._owned, self._engine
        assert engine is not None
        if engine.event_loop is not owned.loop:
            if threading.current_thread() is owned.thread:
                raise RuntimeError(SAME_LOOP_SYNC_CALL)
            asyncio.run_coroutine_threadsafe(engine.start(), owned.loop).result()
        return owned.loop, engine

    def start(self) -> AsyncEngine:
        """Start the engine now (a model-directory runtime otherwise starts it at the first call)."""
        return self._loop_and_engine()[1]

    def close(self) -> None:
        """Stop an owned engine and its thread (a shared engine is left running). Idempotent."""
        if self._finalizer is not None:
            self._finalizer()

    # ---- calls ---------------------------------------------------------------------------
    def _call_sync(self, make: Callable[[AsyncEngine], Awaitable[T]], timeout: float | None = None) -> T:
        loop, engine = self._loop_and_engine()
        if _running_loop() is loop:
            raise RuntimeError(SAME_LOOP_SYNC_CALL)
        future = asyncio.run_coroutine_threadsafe(_awaited(make(engine)), loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    async def _call_async(self, make: Callable[[AsyncEngine], Awaitable[T]]) -> T:
        here = asyncio.get_running_loop()
        loop, engine = await _off_loop(self._loop_and_engine, here, self._engine)
        if loop is here:
            return await make(engine)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_awaited(make(engine)), loop))

    def generate(self, **request: Any) -> Completion:
        """``AsyncEngine.generate(**request)``, waited on from sync code."""
        return self._call_sync(lambda engine: engine.generate(**request))

    async def agenerate(self, **request: Any) -> Completion:
        """``AsyncEngine.generate(**request)`` from any asyncio loop."""
        return await self._call_async(lambda engine: engine.generate(**request))

    def run(self, make: Callable[[AsyncEngine], Awaitable[T]]) -> T:
        """Any engine coroutine (``lambda e: e.cache_prefix(...)``), waited on from sync code."""
        return self._call_sync(make)

    async def arun(self, make: Callable[[AsyncEngine], Awaitable[T]]) -> T:
        """Any engine coroutine, awaited from any asyncio loop."""
        return await self._call_async(make)

    async def astream(self, **request: Any) -> AsyncIterator[StreamChunk]:
        """``AsyncEngine.stream(**request)`` from any asyncio loop, chunk by chunk. Bad input
        raises at the first iteration, before anything is queued."""
        here = asyncio.get_running_loop()
        loop, engine = await _off_loop(self._loop_and_engine, here, self._engine)
        if loop is here:
            stream = engine.stream(**request)
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            return
        inbox: asyncio.Queue[Any] = asyncio.Queue()

        def deliver(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nobody is listening
                here.call_soon_threadsafe(inbox.put_nowait, item)

        pump = asyncio.run_coroutine_threadsafe(_pump(engine, request, deliver), loop)
        try:
            while True:
                item = await inbox.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            pump.cancel()  # on the engine's loop: closes the stream, which aborts the request

    def stream(self, **request: Any) -> Iterator[StreamChunk]:
        """``AsyncEngine.stream(**request)`` from sync code, chunk by chunk (close the iterator
        to abort the request)."""
        loop, engine = self._loop_and_engine()
        if _running_loop() is loop:
            raise RuntimeError(SAME_LOOP_SYNC_CALL)
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        pump = asyncio.run_coroutine_threadsafe(_pump(engine, request, inbox.put), loop)
        try:
            while True:
                item = inbox.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            pump.cancel()


async def _pump(engine: AsyncEngine, request: dict[str, Any], deliver: Callable[[Any], None]) -> None:
    """On the engine's loop: stream ``request`` and hand each chunk, then ``_END`` or the
    error, to ``deliver``. Cancelling it closes the stream (the request is aborted)."""
    try:
        stream = engine.stream(**request)
        try:
            async for chunk in stream:
                deliver(chunk)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
    except asyncio.CancelledError:
        deliver(_END)
        raise
    except BaseException as exc:  # handed to the caller's thread, re-raised there
        deliver(exc)
        return
    deliver(_END)


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def _off_loop(start: Callable[[], T], here: asyncio.AbstractEventLoop, engine: AsyncEngine | None) -> T:
    """``start()`` in a worker thread unless the engine already runs (starting loads weights:
    never on the caller's loop)."""
    if engine is not None and engine.event_loop is not None:
        return start()
    return await here.run_in_executor(None, start)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None

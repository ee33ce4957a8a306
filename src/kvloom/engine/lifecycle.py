"""``EngineLifecycle``: start an ``AsyncEngine``'s parts once, on one event loop, and stop them.

``start`` loads the model in a task of its own (the weights in a worker thread, off the event
loop), then wires the parts on the loop: the ``EngineLoop`` (the background task), its
``PrefixRegistry`` and the ``Submitter``. Works under asyncio (uvloop too) and trio.

Invariants: at most one start attempt is live, and every ``start`` on the event loop that made
it waits for that one (a call from another event loop is refused); a failed attempt is dropped,
so a later ``start`` retries; once ``aclose`` is called no start begins. ``parts``, ``loop``,
``prefixes`` and ``submitter`` are None until a load has finished, then all set; ``aclose``
drops ``parts`` once the engine thread's resources are released.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import anyio

from kvloom.config import EngineConfig
from kvloom.engine.background import event_loop_identity, running_asyncio_loop, spawn_background
from kvloom.engine.build import EngineParts, build_engine
from kvloom.engine.engine_thread import EngineThread
from kvloom.engine.loop import NOT_RUNNING, EngineLoop
from kvloom.engine.prefix_registry import PrefixRegistry
from kvloom.engine.prompts import PromptEncoder
from kvloom.engine.stats import StatsCollector
from kvloom.engine.submit import Submitter
from kvloom.errors import EngineClosedError

STARTED_ELSEWHERE = (
    "this engine is started (or starting) on another event loop: make its requests on that loop, or route "
    "them through kvloom.integrations.runtime.EngineRuntime(engine=engine), which any thread or loop may call"
)


@dataclass(slots=True)
class _StartAttempt:
    """One ``start``: the event loop it runs the engine on, and when it is over."""

    loop: object
    """``event_loop_identity()`` of the loop that called it."""
    done: anyio.Event
    """Set when the load has finished, started or failed (``error``)."""
    error: BaseException | None = None
    task: object = None
    """The loading task (asyncio holds tasks only weakly)."""


class EngineLifecycle:
    """Owns one engine's parts, its background loop, its submitter and its start attempt.

    Thread safety: ``start`` and ``aclose`` may be called from any thread (``_lock`` guards the
    attempt and the closed flag); everything else belongs to the event loop the engine runs on.
    """

    def __init__(self, config: EngineConfig, max_waiting: int, stats: StatsCollector) -> None:
        self.config = config
        self.max_waiting = max_waiting
        self.parts: EngineParts | None = None
        self.loop: EngineLoop | None = None
        self.prefixes: PrefixRegistry | None = None
        self.submitter: Submitter | None = None
        self.event_loop: asyncio.AbstractEventLoop | None = None
        """The asyncio loop the engine was started on (None before it and under trio)."""
        self._stats = stats
        self._lock = threading.Lock()
        """Guards ``_start`` and ``_closed``: ``start`` and ``aclose`` may be called from any thread."""
        self._start: _StartAttempt | None = None
        """The start that runs or ran the engine (None before it, or after one that failed)."""
        self._closed = False
        self._task: object = None
        self.engine_thread = EngineThread()
        """Where the load, every step and the core's close run (``engine.engine_thread``)."""

    async def start(self) -> None:
        """Start once (``AsyncEngine.start`` documents the semantics): the first call loads, the
        others on the same event loop wait for it; an error of the load raises in each of them."""
        here = event_loop_identity()
        with self._lock:
            if self._closed:
                raise EngineClosedError("this engine was closed: build a new one to serve again")
            attempt = self._start
            if attempt is None:
                attempt = self._start = _StartAttempt(here, anyio.Event())
                # The load runs in a task of its own: cancelling any caller, the first included,
                # stops only its wait, never the load the others wait for.
                attempt.task = spawn_background(lambda: self._load_and_run(attempt))
        if attempt.loop is not here:
            raise RuntimeError(STARTED_ELSEWHERE)
        await attempt.done.wait()
        if attempt.error is not None:
            raise attempt.error

    async def _load_and_run(self, attempt: _StartAttempt) -> None:
        """The start's own task (never raises): load off the loop, then wire and run the parts;
        a failure is kept in ``attempt.error`` for every caller, and a later ``start`` retries."""
        try:
            parts, worker_encoder = await self.engine_thread.run(self._load)
            self._run(parts, worker_encoder)
        except BaseException as exc:
            attempt.error = exc
            with self._lock:
                self._start = None
        finally:
            attempt.done.set()

    def _load(self) -> tuple[EngineParts, PromptEncoder]:
        """Engine thread: build the parts (which frees the thread's OpenMP pool at the end, so a loaded
        engine waiting for its first request crowds no other thread's pool)."""
        parts = build_engine(self.config)
        return parts, parts.encoder.clone()

    def _run(self, parts: EngineParts, worker_encoder: PromptEncoder) -> None:
        """Wire the loaded parts and start the background task (on the event loop, no await)."""
        loop = EngineLoop(parts.driver, self._stats, self.config.cache.prefix_pin_fraction, parts.core.num_blocks,
                          self.engine_thread)
        prefixes = loop.prefixes
        self.parts, self.loop, self.prefixes = parts, loop, prefixes
        self.submitter = Submitter(parts, loop, prefixes, worker_encoder, self.max_waiting,
                                   self.config.request_timeout)
        self._task = spawn_background(loop.run)
        self.event_loop = running_asyncio_loop()  # None under trio

    async def aclose(self) -> None:
        """Refuse later starts, wait for one in progress, then stop the loop and release the
        prefix handles, the grammar compile pools and the core (the last two off the loop)."""
        with self._lock:
            self._closed = True
            attempt = self._start
        if attempt is not None:
            await attempt.done.wait()
        loop, parts = self.loop, self.parts
        if loop is None or parts is None:
            return
        await loop.close()
        if self.prefixes is not None:
            self.prefixes.close()
        if self.parts is not None:
            self.parts = None
            await anyio.to_thread.run_sync(parts.grammars.close)
            await self.engine_thread.run(parts.core.close)
        self.engine_thread.close()

    async def wait_started(self) -> None:
        """Wait for a ``start()`` in progress, if any (no checkpoint when there is none)."""
        attempt = self._start
        if attempt is not None and self.loop is None:
            await self.start()

    def running(self) -> tuple[Submitter, EngineLoop]:
        """The submitter and loop of the running engine; ``EngineClosedError`` when it is not
        running or no longer accepts requests, ``EngineDeadError`` when a step failed."""
        if self.loop is not None:
            self.loop.check_accepting()
        if self.submitter is None or self.loop is None:
            raise EngineClosedError(NOT_RUNNING)
        return self.submitter, self.loop

    async def started_loop(self) -> EngineLoop:
        """Wait for a ``start()`` in progress, then the engine's loop (for ``wait_idle``): raises
        ``EngineClosedError`` when there is none and ``RuntimeError`` when the caller's event
        loop is not the engine's."""
        await self.wait_started()
        loop = self.loop
        if loop is None:
            raise EngineClosedError(NOT_RUNNING)
        attempt = self._start
        if attempt is not None and attempt.loop is not event_loop_identity():
            raise RuntimeError(STARTED_ELSEWHERE)
        return loop

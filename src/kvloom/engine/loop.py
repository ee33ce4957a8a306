"""The background loop: hand what the app did to the engine thread, route what comes back.

One task per engine. Each turn it gathers the submitted requests, aborts, unpins and adapter
pins into a ``StepInput`` and hands it to the engine thread (``engine.engine_thread``: the same
thread every turn, so the process keeps one busy OpenMP pool; ``engine.openmp_pool``),
which runs ``EngineDriver.run`` step after step for as long as there is work and the loop has
nothing new for it; each step's ``StepOutput`` is posted to the loop as it is made and routed
there to the request streams, the prefix registry and the stats. The engine thread never
waits for the loop between steps: at one stream, a round trip to the loop per token (two thread
hand-offs, and the loop's work competing with the step's OpenMP threads for the cores) cost more
than a quarter of each step. New input ends the turn at the next step boundary, so an abort or
a new request waits at most one step, as before. Whatever fails inside a turn (a step or the
routing of one) fails every stream in flight with ``EngineError`` and marks the engine dead:
nothing is left waiting.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from typing import TYPE_CHECKING

import anyio

from kvloom.engine.background import Waker
from kvloom.engine.messages import NewRequest, StepInput, StepOutput
from kvloom.engine.openmp_pool import release_calling_thread_pool
from kvloom.engine.prefix_registry import PrefixRegistry
from kvloom.engine.streams import RequestStream
from kvloom.errors import EngineClosedError, EngineDeadError, EngineError, RequestTimeoutError
from kvloom.outputs import StreamChunk

if TYPE_CHECKING:
    from kvloom.engine.driver import EngineDriver
    from kvloom.engine.engine_thread import EngineThread
    from kvloom.engine.stats import StatsCollector
    from kvloom.lora.adapter import LoRAAdapter


NOT_RUNNING = "the engine is not running: use `async with engine:` or `await engine.start()`"


class EngineLoop:
    """Owns the request streams and the queues to the engine thread. Create it on the loop.

    Thread safety: ``abort`` and ``unpin`` may be called from any thread (they only append to
    a deque and wake the loop thread-safely); ``_run_steps`` runs on the engine thread and reads
    only ``_news`` and ``_closing`` of the loop's state; everything else is loop-thread only.
    """

    def __init__(self, driver: EngineDriver, stats: StatsCollector, pin_fraction: float, num_blocks: int,
                 engine_thread: EngineThread) -> None:
        self._driver = driver
        self._engine_thread = engine_thread
        self.prefixes = PrefixRegistry(int(pin_fraction * num_blocks), pin_fraction, num_blocks, self.unpin)
        """Prefix handles; the pins the engine reports go to it, its unpins come back here."""
        self._stats = stats
        self.streams: dict[str, RequestStream] = {}
        self._adds: list[NewRequest] = []
        self._aborts: deque[tuple[str, RequestStream | None]] = deque()
        self._unpins: deque[list[int]] = deque()
        self._pinned_adapters: list[LoRAAdapter] | None = None
        self._waker = Waker()
        self._news = threading.Event()
        """Set when the loop has something for the engine thread (input, or closing): the engine thread
        ends its turn at the next step boundary. Cleared by the loop as it takes the input."""
        self._routing_error: Exception | None = None
        """An error routing a posted step's output (loop thread); the turn then ends and fails everything."""
        self._closing = False
        self.done = anyio.Event()
        self.error: BaseException | None = None
        self.last: StepOutput | None = None
        self._in_step = False
        self._went_idle: anyio.Event | None = None
        """Set (and dropped) by the task once ``is_idle`` holds again after a step, or once the task
        ends; created by the first ``wait_idle`` that has to wait. Loop thread only."""

    # ---- from the application --------------------------------------------------------------
    def submit(self, req: NewRequest) -> RequestStream:
        """Queue ``req`` for the next step; the caller has checked its id is not in flight."""
        assert req.request_id not in self.streams
        stream = RequestStream(req.request_id)
        self.streams[req.request_id] = stream
        self._adds.append(req)
        self._news.set()
        self._waker.wake()
        return stream

    def abort(self, request_id: str, stream: RequestStream | None = None) -> None:
        """End a request (any thread). With ``stream``, only if that very stream is still the
        one in flight under ``request_id``: a finished stream's finalizer never aborts a later
        request that reuses its id."""
        self._aborts.append((request_id, stream))
        self._news.set()
        self._waker.wake_threadsafe()

    def unpin(self, block_ids: list[int]) -> None:
        """Release pinned prefix blocks at the next step (any thread)."""
        self._unpins.append(block_ids)
        self._news.set()
        self._waker.wake_threadsafe()

    def set_pinned_adapters(self, adapters: list[LoRAAdapter]) -> None:
        self._pinned_adapters = adapters
        self._news.set()
        self._waker.wake()

    @property
    def num_submitted(self) -> int:
        """Sequences submitted and not yet handed to the engine thread."""
        return sum(r.params.n for r in self._adds)

    @property
    def is_idle(self) -> bool:
        """Nothing queued for the engine thread, no step in flight, and the last step left no work."""
        return (not self._has_input() and not self._in_step
                and (self.last is None or not self.last.has_unfinished))

    @property
    def step_in_flight(self) -> bool:
        """Whether the engine thread is running a step now."""
        return self._in_step

    async def wait_idle(self) -> None:
        """Return once ``is_idle`` holds (at once if it does). Loop thread only.

        No polling: the task sets an event each time a step leaves it idle, and when it ends.
        Raises ``EngineDeadError`` if a step failed (before or while waiting), ``EngineClosedError``
        if the engine is closing or closed (work still in flight then never finishes).
        """
        while True:
            if self.error is not None:
                raise EngineDeadError(f"the engine failed: {self.error!r}") from self.error
            if self._closing or self.done.is_set():
                raise EngineClosedError(NOT_RUNNING)
            if self.is_idle:
                return
            if self._went_idle is None:
                self._went_idle = anyio.Event()
            await self._went_idle.wait()

    def _wake_idle_waiters(self) -> None:
        """Wake ``wait_idle`` callers when there is news for them: idle, or the task ended."""
        if self._went_idle is not None and (self.is_idle or self.done.is_set()):
            self._went_idle.set()
            self._went_idle = None

    @property
    def is_running(self) -> bool:
        return not self._closing and not self.done.is_set() and self.error is None

    def check_accepting(self) -> None:
        """Raise unless new requests are accepted: ``EngineDeadError`` after a failed step,
        ``EngineClosedError`` once closing."""
        if self.error is not None:
            raise EngineDeadError(f"the engine failed earlier: {self.error!r}") from self.error
        if not self.is_running:
            raise EngineClosedError(NOT_RUNNING)

    async def close(self) -> None:
        """Stop after the current step; streams still open end with ``EngineClosedError``."""
        self._closing = True
        self._news.set()
        self._waker.wake()
        await self.done.wait()
        for stream in self.streams.values():
            stream.fail(EngineClosedError("the engine was closed while this request was in flight"))
        self.streams.clear()

    # ---- the task ----------------------------------------------------------------------------
    def _has_input(self) -> bool:
        return bool(self._adds or self._aborts or self._unpins or self._pinned_adapters is not None)

    def _take_input(self) -> StepInput:
        self._news.clear()  # before reading: anything added from here on sets it again
        adds, self._adds = self._adds, []
        aborts: list[str] = []
        while self._aborts:
            request_id, stream = self._aborts.popleft()
            current = self.streams.get(request_id)
            if current is not None and not current.finished and (stream is None or stream is current):
                aborts.append(request_id)
        unpins = [self._unpins.popleft() for _ in range(len(self._unpins))]
        pinned, self._pinned_adapters = self._pinned_adapters, None
        return StepInput(adds, aborts, unpins, pinned)

    async def run(self) -> None:
        """The background task. Never raises: a failure is recorded in ``error`` and fails
        every stream in flight."""
        try:
            while not self._closing:
                busy = self.last is not None and self.last.has_unfinished
                if not busy:
                    await self._waker.wait(lambda: self._closing or self._has_input())
                    if self._closing:
                        break
                step_input = self._take_input()
                # The engine thread is idle here: free the pool torch ops on this thread may have made,
                # so the step's pool is the only busy one (engine.openmp_pool).
                release_calling_thread_pool()
                self._in_step = True
                try:
                    result = await self._engine_thread.run(functools.partial(self._run_steps, step_input))
                finally:
                    self._in_step = False
                if self._routing_error is not None:
                    raise self._routing_error
                self.last = result
                self._dispatch(result)
                # is_idle can only turn true here: input is taken just before a step, and the
                # step's result is what says whether work is left.
                self._wake_idle_waiters()
        except Exception as exc:  # a failed step or routing fails its requests, never hangs them
            self._fail_all(exc)
        finally:
            self.done.set()
            self._wake_idle_waiters()

    def _run_steps(self, step_input: StepInput) -> StepOutput:
        """Engine thread: steps until the work runs out or the loop has news; posts each output but the
        last (returned) to the loop, in order."""
        while True:
            result = self._driver.run(step_input)
            if not result.has_unfinished:
                release_calling_thread_pool()  # idle: no pool left to crowd another thread's (engine.openmp_pool)
                return result
            if self._news.is_set() or self._closing:
                return result
            if not self._waker.post(functools.partial(self._on_step, result)):
                return result  # the loop is gone: nothing would route the outputs
            step_input = StepInput()

    def _on_step(self, result: StepOutput) -> None:
        """Loop thread: route one posted step's output. A failure ends the turn (the task then fails
        every stream), never raises into the event loop."""
        if self._routing_error is not None:
            return
        try:
            self.last = result
            self._dispatch(result)
        except Exception as exc:
            self._routing_error = exc
            self._news.set()

    def _dispatch(self, result: StepOutput) -> None:
        for request_id, block_ids in result.pinned.items():
            self.prefixes.on_pinned(request_id, block_ids)
        for failure in result.failed:
            stream = self.streams.pop(failure.request_id, None)
            if stream is not None:
                stream.fail(failure.error)
        for partial in result.aborted:
            stream = self.streams.pop(partial.request_id, None)
            if stream is not None:
                stream.push(StreamChunk(partial.request_id, 0, "", [], None, "abort"))
                stream.finish(partial, partial.usage)
        for partial in result.timed_out:
            stream = self.streams.pop(partial.request_id, None)
            if stream is not None:
                stream.fail(RequestTimeoutError(
                    f"request {partial.request_id!r} passed its deadline after {partial.usage.total_time or 0.0:.3f}s "
                    f"and was aborted ({partial.usage.completion_tokens} tokens generated)"), partial)
        num_tokens = 0
        for chunk in result.deltas:
            num_tokens += len(chunk.token_ids)
            stream = self.streams.get(chunk.request_id)
            if stream is not None:
                stream.push(chunk)
        self._stats.record_tokens(num_tokens)
        for completion in result.finished:
            u = completion.usage
            self._stats.record_finished(u.time_to_first_token, u.total_time, u.completion_tokens)
            stream = self.streams.pop(completion.request_id, None)
            if stream is not None:
                stream.finish(completion, completion.usage)

    def _fail_all(self, exc: Exception) -> None:
        self.error = exc
        error = EngineError(f"engine step failed: {exc!r}")
        error.__cause__ = exc
        for stream in self.streams.values():
            stream.fail(error)
        self.streams.clear()


"""``AsyncEngine``: the public async facade.

It only wires the parts together: the ``EngineLifecycle`` (``lifecycle.py``) loads and starts
them once and stops them; the ``Submitter`` (``submit.py``) checks, tokenizes and queues
requests; the ``EngineLoop`` (``loop.py``, the background task) alone talks to the engine
thread; prefix handles live in the ``PrefixRegistry`` and adapters in the ``AdapterRegistry``.
Works under asyncio (uvloop too) and trio.
"""

from __future__ import annotations

import asyncio
import dataclasses
import weakref
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio

from kvloom.config import EngineConfig
from kvloom.engine.adapters import AdapterInfo
from kvloom.engine.build import EngineParts
from kvloom.engine.core import EngineCore
from kvloom.engine.lifecycle import EngineLifecycle
from kvloom.engine.loop import NOT_RUNNING, EngineLoop
from kvloom.engine.prefix import PrefixHandle
from kvloom.engine.prefix_registry import PrefixRegistry
from kvloom.engine.prompts import Message, Prompt
from kvloom.engine.stats import EngineStats, StatsCollector, build_stats
from kvloom.engine.streams import RequestStream, iterate
from kvloom.engine.submit import Submitter
from kvloom.errors import EngineClosedError, InvalidRequestError
from kvloom.kv_cache.manager import KVCacheStats
from kvloom.outputs import Completion, StreamChunk
from kvloom.params import SamplingParams

_PIN_PARAMS = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


class AsyncEngine:
    """An in-process engine for asyncio or trio applications.

    ``AsyncEngine.from_pretrained(model_dir, **config)`` takes every ``EngineConfig`` field
    (cache, scheduler and LoRA fields at top level, ``request_timeout``) plus ``max_waiting``,
    the most sequences that may wait for a slot before ``EngineOverloadedError``.
    """

    def __init__(self, config: EngineConfig, *, max_waiting: int = 1024) -> None:
        if max_waiting < 1:
            raise InvalidRequestError("max_waiting: must be >= 1")
        self.config = config
        self.max_waiting = max_waiting
        self._stats = StatsCollector()
        self._lifecycle = EngineLifecycle(config, max_waiting, self._stats)

    @classmethod
    def from_pretrained(cls, model: str | Path, *, max_waiting: int = 1024, **config: Any) -> AsyncEngine:
        """Configure an engine; weights load in ``start()`` (off the event loop)."""
        return cls(EngineConfig.from_kwargs(model, **config), max_waiting=max_waiting)

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model off the event loop and start the background loop.

        Idempotent, and safe to call concurrently: the first call loads, every other call (from
        any task of the same event loop) waits for it and returns once the engine runs, or
        raises the error the load raised (a later ``start`` then tries again). Cancelling a
        caller, the first included, cancels only its wait: the load goes on for the others and
        the engine starts. A call from another event loop raises ``RuntimeError`` (requests must
        come from the loop that runs the engine: ``kvloom.integrations.runtime.EngineRuntime``
        routes calls from other threads and loops), and a call after ``aclose()`` raises
        ``EngineClosedError``.
        """
        await self._lifecycle.start()

    async def aclose(self) -> None:
        """Stop after the current step; streams still open end with ``EngineClosedError``.
        A start in progress is waited for first. The grammar compile pools shut down off the
        event loop. Idempotent; the engine cannot be started again."""
        await self._lifecycle.aclose()

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def event_loop(self) -> asyncio.AbstractEventLoop | None:
        """The asyncio loop the engine was started on (None before ``start()`` and under trio):
        its requests must be made from that loop (``kvloom.integrations.runtime`` routes calls
        from other threads and loops to it)."""
        return self._lifecycle.event_loop

    @property
    def tokenizer(self) -> Any | None:
        """The event loop's tokenizer (use it on the loop thread only)."""
        return self._parts.encoder.tokenizer if self._parts is not None else None

    @property
    def core(self) -> EngineCore:
        """The engine core, for inspection in tests and tools. The engine thread owns it: read
        it only while no step runs."""
        if self._parts is None:
            raise EngineClosedError(NOT_RUNNING)
        return self._parts.core

    # Read-only views of the lifecycle's parts (None until a start has loaded them).
    @property
    def _parts(self) -> EngineParts | None:
        return self._lifecycle.parts

    @property
    def _loop(self) -> EngineLoop | None:
        return self._lifecycle.loop

    @property
    def _prefixes(self) -> PrefixRegistry | None:
        return self._lifecycle.prefixes

    @property
    def _submitter(self) -> Submitter | None:
        return self._lifecycle.submitter

    # ---- requests ------------------------------------------------------------------------
    def stream(
        self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
        messages: Sequence[Message] | None = None, request_id: str | None = None, priority: int = 0,
        prefix: PrefixHandle | None = None, cache_salt: str | None = None, adapter: str | None = None,
        timeout: float | None = None, tools: Sequence[Any] | None = None, tool_choice: Any = None,
        parallel_tool_calls: bool = True,
    ) -> AsyncIterator[StreamChunk]:
        """Submit a request and stream its chunks. Bad input raises here, before queueing
        (a prompt over ``INLINE_CHARS`` is tokenized in a worker thread at the first iteration,
        and errors that need its tokens raise there; nothing is queued before).

        Leaving the ``async for`` early, cancelling the consuming task, or dropping the
        iterator aborts the request and frees its KV blocks within one step. ``adapter`` names
        a loaded LoRA adapter; ``timeout`` (seconds from now) overrides ``request_timeout``:
        past it the request is aborted and the stream raises ``RequestTimeoutError``.

        ``tools`` (OpenAI tool dicts, pydantic models or typed functions; chat ``messages``
        only) are rendered by the chat template; ``tool_choice`` is ``"auto"`` (default),
        ``"none"``, ``"required"`` or ``{"type": "function", "function": {"name": ...}}``.
        The completion's ``tool_calls`` hold the calls (``finish_reason="tool_calls"``).
        """
        submitter, loop = self._lifecycle.running()
        sub = submitter.check(params, request_id, priority, prefix, cache_salt, adapter, timeout, tools, tool_choice,
                              parallel_tool_calls, messages is not None)
        if submitter.is_long(prompt, messages):
            submitter.reserve(sub.request_id)

            async def submit_later() -> RequestStream:
                return await submitter.encode_and_enqueue(sub, prompt, messages)  # releases the id

            later = iterate(None, self._abort_stream, submit_later)
            weakref.finalize(later, submitter.release, sub.request_id)  # never iterated: free the id
            return later
        encoded = submitter.encode_with(submitter.encoder, sub, prompt, messages)
        stream = submitter.enqueue(sub, *encoded, messages)
        iterator = iterate(stream, self._abort_stream)
        # Dropped without being iterated (no ``finally`` runs then): abort this very stream.
        weakref.finalize(iterator, loop.abort, sub.request_id, stream)
        return iterator

    async def generate(
        self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
        messages: Sequence[Message] | None = None, request_id: str | None = None, priority: int = 0,
        prefix: PrefixHandle | None = None, cache_salt: str | None = None, adapter: str | None = None,
        timeout: float | None = None, tools: Sequence[Any] | None = None, tool_choice: Any = None,
        parallel_tool_calls: bool = True,
    ) -> Completion:
        """Run a request to the end; ``n > 1`` gives ``n`` choices. Same arguments as ``stream``.
        Called while ``start()`` is loading, it waits for the engine first."""
        await self._lifecycle.wait_started()
        submitter, _ = self._lifecycle.running()
        sub = submitter.check(params, request_id, priority, prefix, cache_salt, adapter, timeout, tools, tool_choice,
                              parallel_tool_calls, messages is not None)
        stream = await submitter.encode_and_enqueue(sub, prompt, messages)
        async for _ in iterate(stream, self._abort_stream):
            pass
        assert stream.completion is not None
        return stream.completion

    def abort(self, request_id: str) -> None:
        """End a request; its stream finishes with ``finish_reason="abort"``. Any thread may call it."""
        if self._loop is not None:
            self._loop.abort(request_id)

    def _abort_stream(self, stream: RequestStream) -> None:
        if self._loop is not None:
            self._loop.abort(stream.request_id, stream)

    # ---- observability -------------------------------------------------------------------
    def stats(self) -> EngineStats:
        loop = self._loop
        last = loop.last.snapshot if loop is not None and loop.last is not None else None
        healthy = loop is not None and loop.is_running
        stats = build_stats(last, loop.num_submitted if loop else 0, self._stats, healthy,
                            loop.error if loop else None,
                            self._parts.grammars.compile_summary() if self._parts is not None else None)
        if self._parts is None:
            return stats
        choice = self._parts.core.dtype_choice
        attention, attention_reason = self._parts.core.attention_backend
        weights, weights_reason = self._parts.core.weight_layout
        return dataclasses.replace(stats, dtype=choice.name, dtype_reason=choice.reason,
                                   weights=weights, weights_reason=weights_reason,
                                   kv_cache_dtype=self._parts.core.kv_cache_dtype,
                                   attention_backend=attention, attention_reason=attention_reason,
                                   cuda_graph_sizes=self._parts.core.cuda_graph_sizes,
                                   async_scheduling=self._parts.core.async_scheduling)

    def prefix_cache_stats(self) -> KVCacheStats | None:
        """Hit rate, cached / pinned / used blocks and evictions, as of the last step."""
        loop = self._loop
        return loop.last.snapshot.kv_stats if loop is not None and loop.last is not None else None

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until the engine holds no request: none queued or running, no step in flight, and
        every abort, prefix release and adapter change handed over so far applied.

        Returns at once when it is idle already. Aborts (leaving a stream, ``abort``, a
        timeout) land at the next step boundary, so after cancelling requests this is how to
        know their KV blocks are free: ``await engine.wait_idle()`` then ``engine.assert_idle()``.
        Only what has reached the engine counts: a stream not yet iterated whose prompt is still
        being tokenized (``stream`` of a very long prompt), or a task that has not yet run the
        ``finally`` that closes its stream, is not waited for. No polling: the background loop
        wakes the waiter when a step leaves it idle. Call it on the engine's event loop.

        ``timeout`` (seconds, None: no limit) raises ``TimeoutError`` saying what is still in
        flight. Raises ``EngineClosedError`` when the engine is not running (not started, or
        closing or closed, also while waiting) and ``EngineDeadError`` when a step failed.
        Waits for a ``start()`` in progress first.
        """
        if timeout is not None and not timeout > 0:
            raise InvalidRequestError(f"timeout: must be > 0 seconds or None, got {timeout!r}")
        loop = await self._lifecycle.started_loop()
        if timeout is None:
            await loop.wait_idle()
            return
        with anyio.move_on_after(timeout) as scope:
            await loop.wait_idle()
        if scope.cancelled_caught:
            stats = self.stats()
            raise TimeoutError(
                f"the engine was not idle after {timeout:g}s: {stats.num_running} sequences running and "
                f"{stats.num_waiting} waiting as of the last step"
                f"{', a step in flight' if loop.step_in_flight else ''}")

    def assert_idle(self) -> None:
        """Raise ``AssertionError`` unless the engine holds nothing: no request queued or
        running, every KV block free or only cached, every refcount zero, nothing pinned.
        Call it when no request is in flight."""
        assert self._loop is not None and self._parts is not None, "the engine is not running"
        assert not self._loop.streams, f"streams still open: {sorted(self._loop.streams)}"
        self._parts.core.assert_idle()

    def register_prometheus(self, registry: Any = None, prefix: str = "kvloom") -> Any:
        """Export ``stats()`` as Prometheus gauges (needs the ``prometheus`` extra)."""
        from kvloom.engine.prometheus import register_prometheus

        return register_prometheus(self.stats, registry, prefix)

    # ---- prefix handles ------------------------------------------------------------------
    async def cache_prefix(
        self, prompt: Prompt | None = None, *, messages: Sequence[Message] | None = None,
        cache_salt: str | None = None, adapter: str | None = None, timeout: float | None = None,
        tools: Sequence[Any] | None = None,
    ) -> PrefixHandle:
        """Prefill ``prompt`` (or ``messages``, without a generation prompt) once and pin its
        whole KV blocks. Raises ``PrefixBudgetError`` past ``prefix_pin_fraction`` of the pool.
        Cancelling it (or a timeout) at any point leaves nothing pinned. ``tools`` are rendered
        with ``messages`` as the chat template does (an agent's system prompt plus its tools);
        requests that pass the same tools reuse them."""
        await self._lifecycle.wait_started()
        submitter, _ = self._lifecycle.running()
        assert self._prefixes is not None
        sub = submitter.check(_PIN_PARAMS, None, 0, None, cache_salt, adapter, timeout, tools,
                              "none" if tools is not None else None, True, messages is not None)
        token_ids, _ = await submitter.encode(sub, prompt, messages, add_generation_prompt=False)
        block_size = self.config.cache.block_size
        if len(token_ids) < block_size:
            raise InvalidRequestError(f"prompt: a prefix of {len(token_ids)} tokens fills no block of {block_size}")
        self._prefixes.begin(sub.request_id, len(token_ids) // block_size)
        try:
            stream = submitter.enqueue(sub, token_ids, cache_salt, None, pin_prefix=True)
            async for _ in iterate(stream, self._abort_stream):
                pass
            if stream.completion is None or stream.completion.finish_reason == "abort":
                raise InvalidRequestError(f"prompt: the prefix request {sub.request_id!r} was aborted")
            block_ids = self._prefixes.claim(sub.request_id)
        except BaseException:
            self._prefixes.abandon(sub.request_id)
            raise
        return self._prefixes.add(
            f"prefix-{sub.request_id}", token_ids, block_ids, block_size, cache_salt, messages, adapter,
            sub.lora.content_hash if sub.lora is not None else None,
        )

    def prefixes(self) -> list[PrefixHandle]:
        """The live (unreleased) prefix handles."""
        return self._prefixes.handles() if self._prefixes is not None else []

    # ---- LoRA adapters ---------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str | Path, *, pinned: bool = False) -> AdapterInfo:
        """Load a PEFT LoRA directory under ``name`` (replacing any adapter of that name).

        The files are read and checked in a worker thread: serving goes on meanwhile. A pinned
        adapter keeps a device slot (a request already running on another adapter keeps its
        slot until it ends). Requests already submitted keep the adapter they named.
        """
        _, loop = self._lifecycle.running()
        assert self._parts is not None
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"name: an adapter name must be a non-empty string, got {name!r:.60}")
        if not isinstance(path, str | Path) or not str(path):
            raise InvalidRequestError(f"path: expected an adapter directory, got {path!r:.60}")
        if not isinstance(pinned, bool):
            raise InvalidRequestError(f"pinned: expected a bool, got {type(pinned).__name__}")
        registry = self._parts.adapters
        adapter = await anyio.to_thread.run_sync(registry.read, path)
        info = registry.add(name, adapter, pinned)
        loop.set_pinned_adapters(registry.pinned())
        return info

    async def unload_adapter(self, name: str) -> None:
        """Forget ``name``: new requests can no longer use it; those in flight finish with it."""
        _, loop = self._lifecycle.running()
        assert self._parts is not None
        self._parts.adapters.remove(name)
        loop.set_pinned_adapters(self._parts.adapters.pinned())

    def adapters(self) -> list[AdapterInfo]:
        """The loaded adapters, by name."""
        return self._parts.adapters.infos() if self._parts is not None else []

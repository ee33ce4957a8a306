"""``AsyncEngine``: the public async facade.

It validates and tokenizes requests and hands them to the ``EngineLoop`` (the background
task, ``loop.py``), which alone talks to the engine thread. Prefix handles live in the
``PrefixRegistry`` and adapters in the ``AdapterRegistry``; this class holds no scheduling or
bookkeeping logic of its own. Works under asyncio (uvloop too) and trio.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from kvloom.config import EngineConfig
from kvloom.engine.adapters import AdapterInfo
from kvloom.engine.background import spawn_background
from kvloom.engine.build import EngineParts, build_engine
from kvloom.engine.core import EngineCore
from kvloom.engine.loop import EngineLoop
from kvloom.engine.messages import NewRequest
from kvloom.engine.prefix import PrefixHandle, check_prefix_adapter, prefix_token_ids
from kvloom.engine.prefix_registry import PrefixRegistry
from kvloom.engine.prompts import Message, Prompt, PromptEncoder
from kvloom.engine.stats import EngineStats, StatsCollector, build_stats
from kvloom.engine.streams import RequestStream
from kvloom.errors import EngineClosedError, EngineDeadError, EngineOverloadedError, InvalidRequestError
from kvloom.kv_cache.manager import KVCacheStats
from kvloom.outputs import Completion, StreamChunk
from kvloom.params import SamplingParams

if TYPE_CHECKING:
    from kvloom.lora.adapter import LoRAAdapter

_NOT_RUNNING = "the engine is not running: use `async with engine:` or `await engine.start()`"
_PIN_PARAMS = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


@dataclass(slots=True)
class _Submission:
    """A request checked before tokenizing (everything but its prompt)."""

    request_id: str
    params: SamplingParams
    priority: int
    prefix: PrefixHandle | None
    cache_salt: str | None
    lora: LoRAAdapter | None
    arrival_time: float
    deadline: float | None


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
        self._parts: EngineParts | None = None
        self._loop: EngineLoop | None = None
        self._prefixes: PrefixRegistry | None = None
        self._worker_encoder: PromptEncoder | None = None
        self._encode_limiter: anyio.CapacityLimiter | None = None
        self._encoding: set[str] = set()
        """Request ids reserved while their prompt is tokenized off the loop."""
        self._starting = False
        self._task: object = None
        self._stats = StatsCollector()
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, model: str | Path, *, max_waiting: int = 1024, **config: Any) -> AsyncEngine:
        """Configure an engine; weights load in ``start()`` (off the event loop)."""
        return cls(EngineConfig.from_kwargs(model, **config), max_waiting=max_waiting)

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model off the event loop and start the background loop (idempotent)."""
        if self._starting or self._loop is not None:
            return
        self._starting = True
        try:
            parts, worker = await anyio.to_thread.run_sync(self._load)
        finally:
            self._starting = False
        self._parts, self._worker_encoder = parts, worker
        self._encode_limiter = anyio.CapacityLimiter(1)
        self._loop = EngineLoop(parts.driver, None, self._stats)
        cache = self.config.cache
        self._prefixes = PrefixRegistry(int(cache.prefix_pin_fraction * parts.core.num_blocks),
                                        cache.prefix_pin_fraction, parts.core.num_blocks, self._loop.unpin)
        self._loop.prefixes = self._prefixes
        self._task = spawn_background(self._loop.run)

    def _load(self) -> tuple[EngineParts, PromptEncoder]:
        parts = build_engine(self.config)
        return parts, parts.encoder.clone()

    async def aclose(self) -> None:
        """Stop after the current step; streams still open end with ``EngineClosedError``.
        The grammar compile pools shut down off the event loop."""
        loop, parts = self._loop, self._parts
        if loop is None or parts is None:
            return
        await loop.close()
        if self._prefixes is not None:
            self._prefixes.close()
        if self._parts is not None:
            self._parts = None
            await anyio.to_thread.run_sync(parts.grammars.close)

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def tokenizer(self) -> Any | None:
        """The event loop's tokenizer (use it on the loop thread only)."""
        return self._parts.encoder.tokenizer if self._parts is not None else None

    @property
    def core(self) -> EngineCore:
        """The engine core, for inspection in tests and tools. The engine thread owns it: read
        it only while no step runs (e.g. after ``assert_idle``-style waits)."""
        if self._parts is None:
            raise EngineClosedError(_NOT_RUNNING)
        return self._parts.core

    # ---- requests ------------------------------------------------------------------------
    def stream(
        self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
        messages: Sequence[Message] | None = None, request_id: str | None = None, priority: int = 0,
        prefix: PrefixHandle | None = None, cache_salt: str | None = None, adapter: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Submit a request and stream its chunks. Bad input raises here, before queueing
        (for a prompt over ``INLINE_CHARS``, tokenized in a worker thread, errors that need
        its tokens raise at the first iteration; nothing is queued before).

        Leaving the ``async for`` early, cancelling the consuming task, or dropping the
        iterator aborts the request and frees its KV blocks within one step. ``adapter`` names
        a loaded LoRA adapter; ``timeout`` (seconds from now) overrides ``request_timeout``:
        past it the request is aborted and the stream raises ``RequestTimeoutError``.
        """
        sub = self._check(params, request_id, priority, prefix, cache_salt, adapter, timeout)
        if self._is_long(prompt, messages):
            self._encoding.add(sub.request_id)
            later = self._iterate(None, lambda: self._encode_later(sub, prompt, messages))
            weakref.finalize(later, self._encoding.discard, sub.request_id)  # never iterated: free the id
            return later
        stream = self._enqueue(sub, *self._encode(self._encoder(), sub, prompt, messages))
        iterator = self._iterate(stream)
        weakref.finalize(iterator, self._require_loop().abort, sub.request_id, stream)
        return iterator

    async def generate(
        self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
        messages: Sequence[Message] | None = None, request_id: str | None = None, priority: int = 0,
        prefix: PrefixHandle | None = None, cache_salt: str | None = None, adapter: str | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """Run a request to the end; ``n > 1`` gives ``n`` choices. Same arguments as ``stream``."""
        sub = self._check(params, request_id, priority, prefix, cache_salt, adapter, timeout)
        stream = await self._submit_async(sub, prompt, messages)
        async for _ in self._iterate(stream):
            pass
        assert stream.completion is not None
        return stream.completion

    def abort(self, request_id: str) -> None:
        """End a request; its stream finishes with ``finish_reason="abort"``. Any thread may call it."""
        if self._loop is not None:
            self._loop.abort(request_id)

    # ---- the submit pipeline: check, tokenize (here or in a worker), enqueue ---------------
    def _require_loop(self) -> EngineLoop:
        if self._loop is not None and self._loop.error is not None:
            raise EngineDeadError(f"the engine failed earlier: {self._loop.error!r}") from self._loop.error
        if self._loop is None or not self._loop.is_running:
            raise EngineClosedError(_NOT_RUNNING)
        return self._loop

    def _encoder(self) -> PromptEncoder:
        assert self._parts is not None
        return self._parts.encoder

    def _check(
        self, params: SamplingParams | None, request_id: str | None, priority: int, prefix: PrefixHandle | None,
        cache_salt: str | None, adapter: str | None, timeout: float | None,
    ) -> _Submission:
        """Everything that can be checked before tokenizing."""
        loop = self._require_loop()
        assert self._parts is not None and self._prefixes is not None
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params: expected SamplingParams, got {type(params).__name__}")
        if timeout is not None and not timeout > 0:
            raise InvalidRequestError(f"timeout: must be > 0 seconds, got {timeout!r}")
        if prefix is not None and not self._prefixes.is_live(prefix):
            raise InvalidRequestError("prefix: this handle was released, or belongs to another or a closed engine")
        self._parts.grammars.check(params)
        lora = self._parts.adapters.resolve_for_request(adapter)
        if prefix is not None:
            check_prefix_adapter(prefix, adapter, lora.content_hash if lora is not None else None)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif request_id in loop.streams or request_id in self._encoding:
            raise InvalidRequestError(f"request_id: {request_id!r} is already in flight")
        now = time.monotonic()
        timeout = timeout if timeout is not None else self.config.request_timeout
        return _Submission(request_id, params, priority, prefix, cache_salt, lora, now,
                           now + timeout if timeout is not None else None)

    @staticmethod
    def _is_long(prompt: Prompt | None, messages: Sequence[Message] | None) -> bool:
        return PromptEncoder.is_long(prompt, messages)

    @staticmethod
    def _encode(
        encoder: PromptEncoder, sub: _Submission, prompt: Prompt | None, messages: Sequence[Message] | None,
        add_generation_prompt: bool = True,
    ) -> tuple[list[int], str | None, Sequence[Message] | None]:
        """Token ids and cache salt (touches only ``encoder``'s tokenizer: any one thread)."""
        if sub.prefix is not None:
            token_ids, salt = prefix_token_ids(sub.prefix, encoder, prompt, messages, sub.cache_salt)
        else:
            token_ids, salt = encoder.to_token_ids(prompt, messages, add_generation_prompt), sub.cache_salt
        encoder.validate(token_ids, sub.params)
        return token_ids, salt, messages

    async def _encode_in_worker(
        self, sub: _Submission, prompt: Prompt | None, messages: Sequence[Message] | None,
        add_generation_prompt: bool = True,
    ) -> tuple[list[int], str | None, Sequence[Message] | None]:
        assert self._worker_encoder is not None and self._encode_limiter is not None
        worker = self._worker_encoder
        return await anyio.to_thread.run_sync(
            lambda: self._encode(worker, sub, prompt, messages, add_generation_prompt), limiter=self._encode_limiter)

    async def _encode_later(
        self, sub: _Submission, prompt: Prompt | None, messages: Sequence[Message] | None,
    ) -> RequestStream:
        try:
            encoded = await self._encode_in_worker(sub, prompt, messages)
        finally:
            self._encoding.discard(sub.request_id)
        return self._enqueue(sub, *encoded)

    async def _submit_async(
        self, sub: _Submission, prompt: Prompt | None, messages: Sequence[Message] | None,
        add_generation_prompt: bool = True, pin_prefix: bool = False,
    ) -> RequestStream:
        if not self._is_long(prompt, messages):
            encoded = self._encode(self._encoder(), sub, prompt, messages, add_generation_prompt)
            return self._enqueue(sub, *encoded, pin_prefix=pin_prefix)
        self._encoding.add(sub.request_id)
        try:
            encoded = await self._encode_in_worker(sub, prompt, messages, add_generation_prompt)
        finally:
            self._encoding.discard(sub.request_id)
        return self._enqueue(sub, *encoded, pin_prefix=pin_prefix)

    def _enqueue(
        self, sub: _Submission, token_ids: list[int], cache_salt: str | None, messages: Sequence[Message] | None,
        *, pin_prefix: bool = False,
    ) -> RequestStream:
        """Admission control, then hand the request to the loop (no await: atomic on the loop)."""
        loop = self._require_loop()  # again: a worker-thread tokenize may have outlived the engine
        assert self._parts is not None and self._prefixes is not None
        if sub.request_id in loop.streams:
            raise InvalidRequestError(f"request_id: {sub.request_id!r} is already in flight")
        waiting = loop.num_submitted + (loop.last.snapshot.num_waiting if loop.last is not None else 0)
        if waiting >= self.max_waiting:
            raise EngineOverloadedError(f"{waiting} sequences are waiting (max_waiting={self.max_waiting})")
        if sub.prefix is not None:
            sub.prefix.hits += 1
        elif messages is not None:
            self._prefixes.count_message_hits(messages, cache_salt)
        return loop.submit(NewRequest(
            sub.request_id, token_ids, sub.params, sub.priority, sub.arrival_time, sub.deadline, cache_salt,
            pin_prefix, grammar=self._parts.grammars.submit(sub.params), lora=sub.lora,
        ))

    async def _iterate(
        self, stream: RequestStream | None, setup: Callable[[], Awaitable[RequestStream]] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Drain ``stream`` (or the one ``setup`` submits); an unfinished stream is aborted on exit."""
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
            if not stream.finished and self._loop is not None:
                self._loop.abort(stream.request_id, stream)

    # ---- observability -------------------------------------------------------------------
    def stats(self) -> EngineStats:
        loop = self._loop
        last = loop.last.snapshot if loop is not None and loop.last is not None else None
        healthy = loop is not None and loop.is_running
        return build_stats(last, loop.num_submitted if loop else 0, self._stats, healthy,
                           loop.error if loop else None)

    def prefix_cache_stats(self) -> KVCacheStats | None:
        """Hit rate, cached / pinned / used blocks and evictions, as of the last step."""
        loop = self._loop
        return loop.last.snapshot.kv_stats if loop is not None and loop.last is not None else None

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
    ) -> PrefixHandle:
        """Prefill ``prompt`` (or ``messages``, without a generation prompt) once and pin its
        whole KV blocks. Raises ``PrefixBudgetError`` past ``prefix_pin_fraction`` of the pool.
        Cancelling it (or a timeout) at any point leaves nothing pinned."""
        sub = self._check(_PIN_PARAMS, None, 0, None, cache_salt, adapter, timeout)
        assert self._prefixes is not None
        if self._is_long(prompt, messages):
            token_ids, _, _ = await self._encode_in_worker(sub, prompt, messages, add_generation_prompt=False)
        else:
            token_ids, _, _ = self._encode(self._encoder(), sub, prompt, messages, add_generation_prompt=False)
        block_size = self.config.cache.block_size
        if len(token_ids) < block_size:
            raise InvalidRequestError(f"prompt: a prefix of {len(token_ids)} tokens fills no block of {block_size}")
        self._prefixes.begin(sub.request_id, len(token_ids) // block_size)
        try:
            stream = self._enqueue(sub, token_ids, cache_salt, None, pin_prefix=True)
            async for _ in self._iterate(stream):
                pass
            block_ids = self._prefixes.claim(sub.request_id)
        except BaseException:
            self._prefixes.abandon(sub.request_id)
            raise
        if stream.completion is None or stream.completion.finish_reason == "abort":
            if block_ids and self._loop is not None:
                self._loop.unpin(block_ids)
            raise InvalidRequestError(f"prompt: the prefix request {sub.request_id!r} was aborted before it finished")
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
        loop = self._require_loop()
        assert self._parts is not None
        registry = self._parts.adapters
        adapter = await anyio.to_thread.run_sync(registry.read, path)
        info = registry.add(name, adapter, pinned)
        loop.set_pinned_adapters(registry.pinned())
        return info

    async def unload_adapter(self, name: str) -> None:
        """Forget ``name``: new requests can no longer use it; those in flight finish with it."""
        loop = self._require_loop()
        assert self._parts is not None
        self._parts.adapters.remove(name)
        loop.set_pinned_adapters(self._parts.adapters.pinned())

    def adapters(self) -> list[AdapterInfo]:
        """The loaded adapters, by name."""
        return self._parts.adapters.infos() if self._parts is not None else []

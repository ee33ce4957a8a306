"""``AsyncEngine``: continuous batching in a background task, token streams for the app.

The event loop side validates and tokenizes requests, keeps one buffer per request and hands
new and aborted requests to the engine thread at step boundaries. The engine thread (one
at a time, through ``anyio.to_thread``) alone touches the core. The loop never blocks on
the model: loading and every step run off it. Works under asyncio (uvloop too) and trio.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio

from kvloom.config import EngineConfig
from kvloom.engine.adapters import AdapterInfo, AdapterRegistry
from kvloom.engine.background import spawn_background
from kvloom.engine.driver import EngineDriver, NewRequest, StepResult
from kvloom.engine.grammar import GrammarService
from kvloom.engine.prefix import PrefixHandle, check_prefix_adapter, prefix_token_ids
from kvloom.engine.processor import InputProcessor, Message, Prompt
from kvloom.engine.request_stream import RequestState
from kvloom.engine.stats import EngineStats, StatsCollector, build_stats
from kvloom.errors import (
    EngineClosedError,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidRequestError,
    PrefixBudgetError,
)
from kvloom.kv_cache.manager import KVCacheStats
from kvloom.outputs import Completion, StreamChunk
from kvloom.params import SamplingParams


class AsyncEngine:
    """An in-process engine for asyncio or trio applications.

    ``AsyncEngine.from_pretrained(model_dir, **config)`` takes every ``EngineConfig`` field
    (cache and scheduler fields at top level) plus ``max_waiting``, the most requests that
    may wait for a slot before ``EngineOverloadedError``.
    """

    def __init__(self, config: EngineConfig, *, max_waiting: int = 1024) -> None:
        if max_waiting < 1:
            raise InvalidRequestError("max_waiting: must be >= 1")
        self.config = config
        self.max_waiting = max_waiting
        self._driver: EngineDriver | None = None
        self._inputs: InputProcessor | None = None
        self._grammars: GrammarService | None = None
        self._adapters: AdapterRegistry | None = None
        self._pinned_loras_changed = False
        self._states: dict[str, RequestState] = {}
        self._adds: list[NewRequest] = []
        self._aborts: deque[str] = deque()  # appended from any thread (stream finalizers)
        self._wake = anyio.Event()
        self._done: anyio.Event | None = None
        self._task: object = None
        self._closing = False
        self._error: BaseException | None = None
        self._last: StepResult | None = None
        self._stats = StatsCollector()
        self._ids = itertools.count()
        self._prefixes: dict[str, PrefixHandle] = {}
        self._pinned: dict[str, list[int]] = {}
        self._unpins: list[list[int]] = []
        self._num_pinned_blocks = 0

    @classmethod
    def from_pretrained(cls, model: str | Path, *, max_waiting: int = 1024, **config: Any) -> AsyncEngine:
        """Configure an engine; weights load in ``start()`` (off the event loop)."""
        return cls(EngineConfig.from_kwargs(model, **config), max_waiting=max_waiting)

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self._done is not None:
            return
        self._done = anyio.Event()
        try:
            driver, self._inputs, self._grammars = await anyio.to_thread.run_sync(self._load)
        except BaseException:
            self._done.set()
            raise
        self._driver = driver
        self._adapters = AdapterRegistry(driver.core.model_config, self.config.lora.max_lora_rank,
                                         self.config.lora.max_loras)
        self._task = spawn_background(self._run)

    def _load(self) -> tuple[EngineDriver, InputProcessor, GrammarService]:
        from kvloom.engine.core import EngineCore
        from kvloom.engine.tokenizer import load_tokenizer

        core = EngineCore(self.config)
        tokenizer = load_tokenizer(self.config.model)
        inputs = InputProcessor(tokenizer, core.model_config.vocab_size, core.max_model_len, core.max_tokens_in_pool)
        grammars = GrammarService(
            tokenizer, core.model_config.vocab_size, tuple(core.model_config.eos_token_ids),
            self.config.grammar_backend, self.config.grammar_compile_timeout,
        )
        return EngineDriver(core, tokenizer, self.config.grammar_compile_timeout), inputs, grammars

    async def aclose(self) -> None:
        """Stop after the current step; streams still open end with ``EngineClosedError``."""
        if self._done is None or self._closing:
            if self._done is not None:
                await self._done.wait()
            return
        self._closing = True
        self._wake.set()
        await self._done.wait()
        for state in self._states.values():
            state.fail(EngineClosedError("the engine was closed while this request was in flight"))
        self._states.clear()
        for handle in self._prefixes.values():
            handle.released = True
        self._prefixes.clear()
        self._driver = None
        if self._grammars is not None:
            self._grammars.close()
            self._grammars = None

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def tokenizer(self) -> Any | None:
        return self._driver.outputs.tokenizer if self._driver is not None else None

    # ---- requests ------------------------------------------------------------------------
    def stream(
        self,
        prompt: Prompt | None = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        prefix: PrefixHandle | None = None,
        cache_salt: str | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Submit a request and stream its chunks. Bad input raises here, before queueing.

        Leaving the ``async for`` early, cancelling the consuming task, or dropping the
        iterator aborts the request and frees its KV blocks within one step. ``adapter`` names
        a loaded LoRA adapter (``load_adapter``); None runs the base model.
        """
        request_id = self._submit(prompt, params, messages, request_id, priority, prefix, cache_salt, adapter)
        iterator = self._iterate(self._states[request_id])
        weakref.finalize(iterator, self._abandon, request_id)
        return iterator

    async def generate(
        self,
        prompt: Prompt | None = None,
        params: SamplingParams | None = None,
        *,
        messages: Sequence[Message] | None = None,
        request_id: str | None = None,
        priority: int = 0,
        prefix: PrefixHandle | None = None,
        cache_salt: str | None = None,
        adapter: str | None = None,
    ) -> Completion:
        """Run a request to the end; ``n > 1`` gives ``n`` choices."""
        request_id = self._submit(prompt, params, messages, request_id, priority, prefix, cache_salt, adapter)
        state = self._states[request_id]
        async for _ in self._iterate(state):
            pass
        assert state.completion is not None
        return state.completion

    def abort(self, request_id: str) -> None:
        """End a request; its stream finishes with ``finish_reason="abort"``."""
        state = self._states.get(request_id)
        if state is None or state.finished:
            return
        self._aborts.append(request_id)
        self._wake.set()

    def _abandon(self, request_id: str) -> None:
        """The stream was dropped unfinished (may run on any thread: only a deque append)."""
        if request_id in self._states:
            self._aborts.append(request_id)

    def _submit(
        self, prompt: Prompt | None, params: SamplingParams | None, messages: Sequence[Message] | None,
        request_id: str | None, priority: int, prefix: PrefixHandle | None = None, cache_salt: str | None = None,
        adapter: str | None = None, pin_prefix: bool = False,
    ) -> str:
        if self._error is not None:
            raise EngineDeadError(f"the engine failed earlier: {self._error!r}") from self._error
        if self._inputs is None or self._closing:
            raise EngineClosedError("the engine is not running: use `async with engine:` or `await engine.start()`")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params: expected SamplingParams, got {type(params).__name__}")
        if prefix is not None:
            if not prefix.owned_by(self) or prefix.handle_id not in self._prefixes:
                raise InvalidRequestError("prefix: this handle was released, or belongs to another or a closed engine")
            token_ids, cache_salt = prefix_token_ids(prefix, self._inputs, prompt, messages, cache_salt)
        else:
            token_ids = self._inputs.to_token_ids(prompt, messages, add_generation_prompt=not pin_prefix)
            if messages is not None:
                for handle in self._prefixes.values():
                    if handle.matches_messages(messages) and handle.cache_salt == cache_salt:
                        handle.hits += 1
        self._inputs.validate(token_ids, params)
        assert self._grammars is not None and self._adapters is not None
        self._grammars.check(params)
        lora = self._adapters.resolve(adapter)
        if prefix is not None:
            check_prefix_adapter(prefix, adapter, lora.content_hash if lora is not None else None)
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif request_id in self._states:
            raise InvalidRequestError(f"request_id: {request_id!r} is already in flight")
        waiting = len(self._adds) + (self._last.num_waiting if self._last is not None else 0)
        if waiting >= self.max_waiting:
            raise EngineOverloadedError(f"{waiting} requests are waiting (max_waiting={self.max_waiting})")
        self._states[request_id] = RequestState(request_id)
        self._adds.append(
            NewRequest(request_id, token_ids, params, priority, time.monotonic(), cache_salt, pin_prefix,
                       grammar=self._grammars.submit(params), lora=lora)
        )
        self._wake.set()
        return request_id

    async def _iterate(self, state: RequestState) -> AsyncIterator[StreamChunk]:
        try:
            while True:
                await state.wait()
                for chunk in state.take():
                    yield chunk
                if state.finished and not state.pending:
                    if state.error is not None:
                        raise state.error
                    return
        finally:
            if not state.finished:
                self.abort(state.request_id)

    # ---- the background loop -------------------------------------------------------------
    async def _run(self) -> None:
        assert self._done is not None and self._driver is not None
        driver = self._driver
        try:
            while not self._closing:
                idle = self._last is None or not self._last.has_unfinished
                if not self._adds and not self._aborts and not self._unpins and not self._pinned_loras_changed and idle:
                    self._wake = anyio.Event()
                    await self._wake.wait()
                    continue
                adds, self._adds = self._adds, []
                aborts = [self._aborts.popleft() for _ in range(len(self._aborts))]
                unpins, self._unpins = self._unpins, []
                pinned_loras = None
                if self._pinned_loras_changed and self._adapters is not None:
                    pinned_loras, self._pinned_loras_changed = self._adapters.pinned(), False
                try:
                    result = await anyio.to_thread.run_sync(driver.run, adds, aborts, unpins, pinned_loras)
                except Exception as exc:  # a failed step fails its requests, never hangs them
                    self._fail_all(exc)
                    return
                self._last = result
                self._dispatch(result)
        finally:
            self._done.set()

    def _dispatch(self, result: StepResult) -> None:
        self._pinned.update(result.pinned)
        for request_id, error in result.failed:
            state = self._states.pop(request_id, None)
            if state is not None:
                state.fail(error)
        for partial in result.aborted:
            state = self._states.pop(partial.request_id, None)
            if state is not None:
                state.push(StreamChunk(partial.request_id, 0, "", [], None, "abort"))
                state.finish(partial, partial.usage)
        num_tokens = 0
        for delta in result.deltas:
            num_tokens += len(delta.token_ids)
            state = self._states.get(delta.parent_id)
            if state is not None:
                state.push(StreamChunk(delta.parent_id, delta.index, delta.text, delta.token_ids,
                                       delta.logprobs, delta.finish_reason))
        self._stats.record_tokens(num_tokens)
        for completion in result.finished:
            u = completion.usage
            self._stats.record_finished(u.time_to_first_token, u.total_time, u.completion_tokens)
            state = self._states.pop(completion.request_id, None)
            if state is not None:
                state.finish(completion, completion.usage)

    def _fail_all(self, exc: Exception) -> None:
        self._error = exc
        error = EngineError(f"engine step failed: {exc!r}")
        error.__cause__ = exc
        for state in self._states.values():
            state.fail(error)
        self._states.clear()

    # ---- observability -------------------------------------------------------------------
    def assert_idle(self) -> None:
        """Raise ``AssertionError`` unless the engine holds nothing: no request queued or
        running, every KV block free or only cached, every refcount zero, nothing pinned."""
        assert self._driver is not None, "the engine is not running"
        self._driver.core.assert_idle()

    def stats(self) -> EngineStats:
        healthy = self._error is None and self._done is not None and not self._done.is_set()
        return build_stats(self._last, len(self._adds), self._stats, healthy, self._error)

    def prefix_cache_stats(self) -> KVCacheStats | None:
        """Hit rate, cached / pinned / used blocks and evictions, as of the last step."""
        return self._last.kv_stats if self._last is not None else None

    # ---- prefix handles ------------------------------------------------------------------
    async def cache_prefix(
        self, prompt: Prompt | None = None, *, messages: Sequence[Message] | None = None,
        cache_salt: str | None = None, adapter: str | None = None,
    ) -> PrefixHandle:
        """Prefill ``prompt`` (or ``messages``, without a generation prompt) once and pin its
        whole KV blocks. Raises ``PrefixBudgetError`` past ``prefix_pin_fraction`` of the pool."""
        if self._inputs is None:
            raise EngineClosedError("the engine is not running: use `async with engine:` or `await engine.start()`")
        token_ids = self._inputs.to_token_ids(prompt, messages, add_generation_prompt=False)
        block_size = self.config.cache.block_size
        num_blocks = len(token_ids) // block_size
        if num_blocks == 0:
            raise InvalidRequestError(f"prompt: a prefix of {len(token_ids)} tokens fills no block of {block_size}")
        assert self._last is not None or self._driver is not None
        total = self._driver.core.kv.num_blocks if self._driver is not None else 0
        budget = int(self.config.cache.prefix_pin_fraction * total)
        if self._num_pinned_blocks + num_blocks > budget:
            raise PrefixBudgetError(
                f"pinning {num_blocks} more blocks would exceed the pin budget ({self._num_pinned_blocks} pinned of "
                f"{budget} = prefix_pin_fraction {self.config.cache.prefix_pin_fraction} x {total} blocks)"
            )
        self._num_pinned_blocks += num_blocks  # reserved now, so concurrent calls see it
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        try:
            # Resolved with no await before the submit: the handle records the weights it ran with.
            lora = self._adapters.resolve(adapter) if self._adapters is not None else None
            rid = self._submit(token_ids, params, None, None, 0, None, cache_salt, adapter, pin_prefix=True)
            state = self._states[rid]
            async for _ in self._iterate(state):
                pass
        except BaseException:
            self._num_pinned_blocks -= num_blocks
            raise
        block_ids = self._pinned.pop(rid, [])
        self._num_pinned_blocks += len(block_ids) - num_blocks
        handle = PrefixHandle(
            f"prefix-{rid}", tuple(token_ids), block_ids, block_size, cache_salt,
            tuple(messages) if messages is not None else None, adapter=adapter,
            adapter_hash=lora.content_hash if lora is not None else None, _engine=weakref.ref(self),
        )
        self._prefixes[handle.handle_id] = handle
        return handle

    def prefixes(self) -> list[PrefixHandle]:
        """The live (unreleased) prefix handles."""
        return list(self._prefixes.values())

    def _release_prefix(self, handle: PrefixHandle) -> None:
        if self._prefixes.pop(handle.handle_id, None) is None:
            return
        self._num_pinned_blocks -= handle.num_blocks
        self._unpins.append(list(handle.block_ids))
        self._wake.set()

    # ---- LoRA adapters ---------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str | Path, *, pinned: bool = False) -> AdapterInfo:
        """Load a PEFT LoRA directory under ``name`` (replacing any adapter of that name).

        The files are read and checked in a worker thread: serving goes on meanwhile. A pinned
        adapter keeps its device slot. Requests already submitted keep the adapter they named.
        """
        if self._adapters is None or self._closing:
            raise EngineClosedError("the engine is not running: use `async with engine:` or `await engine.start()`")
        adapter = await anyio.to_thread.run_sync(self._adapters.read, path)
        info = self._adapters.add(name, adapter, pinned)
        self._pinned_loras_changed = True
        self._wake.set()
        return info

    async def unload_adapter(self, name: str) -> None:
        """Forget ``name``: new requests can no longer use it; those in flight finish with it."""
        if self._adapters is None:
            raise EngineClosedError("the engine is not running: use `async with engine:` or `await engine.start()`")
        self._adapters.remove(name)
        self._pinned_loras_changed = True
        self._wake.set()

    def adapters(self) -> list[AdapterInfo]:
        """The loaded adapters, by name."""
        return self._adapters.infos() if self._adapters is not None else []

    def register_prometheus(self, registry: Any = None, prefix: str = "kvloom") -> Any:
        """Export ``stats()`` as Prometheus gauges (needs the ``prometheus`` extra)."""
        from kvloom.engine.prometheus import register_prometheus

        return register_prometheus(self.stats, registry, prefix)

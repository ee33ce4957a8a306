"""What ``ChatKVLoom`` and ``KVLoom`` share: where the engine is, the standard LangChain
parameters, and how one call's arguments become one engine request.

Construction only validates fields: the engine is reached through an ``EngineRuntime`` made
at the first call, which loads the weights then (never in ``__init__``: LangChain builds
models freely, e.g. per request, and its standard suite times ten constructions).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from kvloom.engine.async_engine import AsyncEngine
from kvloom.errors import EngineOverloadedError, InvalidRequestError
from kvloom.integrations.runtime import EngineRuntime
from kvloom.outputs import Completion, StreamChunk
from kvloom.params import SamplingParams

REQUEST_ARGS = frozenset({"adapter", "prefix", "cache_salt", "priority", "tools", "tool_choice", "parallel_tool_calls"})
"""Per-call arguments that go to ``AsyncEngine.generate`` / ``stream`` as they are."""
SAMPLING_ARGS = frozenset(SamplingParams.model_fields) - {"n"}
"""Per-call arguments that go into the request's ``SamplingParams`` (``n`` stays 1: one message per call)."""


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One call's request: ``AsyncEngine.generate`` keyword arguments without the prompt."""

    kwargs: dict[str, Any]
    model_name: str
    """What serves it: its adapter's name, else the base model's (``response_metadata["model_name"]``)."""
    adapter_from_model: bool
    """The adapter was named by ``model=`` (an unknown one is then reported as a bad ``model``)."""


class _CopyableLock:
    """A ``threading.Lock`` that a copy of its model replaces with a fresh one (pydantic's
    ``model_copy(deep=True)`` and ``copy.deepcopy`` cannot copy a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def __copy__(self) -> _CopyableLock:
        return _CopyableLock()

    def __deepcopy__(self, memo: dict[int, Any]) -> _CopyableLock:
        return _CopyableLock()


class KVLoomSettings(BaseModel):
    """The engine to call and the default sampling of every call.

    Exactly one of ``engine`` (a started or unstarted ``AsyncEngine``, or an ``EngineRuntime``
    to share one engine between several models and frameworks) and ``model_path`` (a checkpoint
    directory: the model then owns an engine, configured by ``engine_kwargs``, started at its
    first call on a thread of its own). ``model`` is the name reported to LangChain; at call
    time ``model=`` picks a loaded LoRA adapter by name (the base model's name picks the base).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    engine: AsyncEngine | EngineRuntime | None = Field(None, exclude=True)
    model_path: str | Path | None = None
    model: str | None = Field(None, description="The base model's name (default: the checkpoint directory's name).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="EngineConfig fields for an owned engine.")
    temperature: float | None = Field(None, ge=0.0)
    max_tokens: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0)
    stop: list[str] | None = None
    timeout: float | None = Field(None, gt=0.0, description="Seconds per request; past it the request is aborted.")
    max_retries: int = Field(2, ge=0, description="Retries of a request the engine refused as overloaded.")
    streaming: bool = False
    logits_processors: list[Callable[[], Any]] | None = Field(None, exclude=True)

    _runtime: EngineRuntime | None = PrivateAttr(None)
    _runtime_lock: _CopyableLock = PrivateAttr(default_factory=_CopyableLock)
    """Makes the runtime once when first calls come from several threads at once (``batch``)."""

    @model_validator(mode="after")
    def _one_engine(self) -> Self:
        if (self.engine is None) == (self.model_path is None):
            raise ValueError("pass engine= (an AsyncEngine or EngineRuntime) or model_path= (a checkpoint "
                             "directory), exactly one of them")
        if self.engine is not None and self.engine_kwargs:
            raise ValueError("engine_kwargs: they configure an owned engine; a given engine= is already configured")
        if self.model is None:
            self.model = self.model_dir.name
        return self

    @property
    def model_dir(self) -> Path:
        """The checkpoint directory served."""
        if isinstance(self.engine, AsyncEngine):
            return Path(self.engine.config.model)
        if isinstance(self.engine, EngineRuntime):
            return self.engine.model_dir
        assert self.model_path is not None
        return Path(self.model_path)

    @property
    def runtime(self) -> EngineRuntime:
        """The runtime every call goes through (made once, at first use, whichever thread gets
        there first; it loads nothing itself)."""
        with self._runtime_lock:
            if self._runtime is None:
                if isinstance(self.engine, EngineRuntime):
                    self._runtime = self.engine
                elif self.engine is not None:
                    self._runtime = EngineRuntime(engine=self.engine)
                else:
                    assert self.model_path is not None
                    self._runtime = EngineRuntime(self.model_path, **self.engine_kwargs)
            return self._runtime

    def close(self) -> None:
        """Stop an engine this model owns (one given as ``engine=`` is left running)."""
        if self._runtime is not None and self.model_path is not None:
            self._runtime.close()

    # ---- one call -> one request -----------------------------------------------------------
    def sampling_defaults(self, stop: list[str] | None) -> dict[str, Any]:
        """The instance's sampling fields that are set, with ``stop`` (the call's, else the instance's)."""
        fields = {"temperature": self.temperature, "max_tokens": self.max_tokens, "top_p": self.top_p,
                  "seed": self.seed, "stop": stop if stop is not None else self.stop,
                  "logits_processors": self.logits_processors}
        return {k: v for k, v in fields.items() if v is not None}

    def build_request(self, stop: list[str] | None, kwargs: dict[str, Any]) -> EngineRequest:
        """One call's request. Call arguments override the instance's. Unknown ones raise
        ``ValueError`` naming them; bad values raise ``pydantic.ValidationError`` naming the field."""
        unknown = sorted(set(kwargs) - REQUEST_ARGS - SAMPLING_ARGS - {"model", "timeout"})
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not an argument of {type(self).__name__} calls (sampling: "
                             f"{', '.join(sorted(SAMPLING_ARGS))}; request: {', '.join(sorted(REQUEST_ARGS))}, "
                             "model, timeout)")
        sampling = {**self.sampling_defaults(stop), **{k: v for k, v in kwargs.items() if k in SAMPLING_ARGS}}
        request = {k: v for k, v in kwargs.items() if k in REQUEST_ARGS and v is not None}
        request["params"] = SamplingParams(**sampling)
        request["timeout"] = kwargs.get("timeout", self.timeout)
        model = kwargs.get("model")
        from_model = model is not None and model != self.model
        if from_model:
            if request.get("adapter", model) != model:
                raise ValueError(f"model: {model!r} names an adapter, and adapter={request['adapter']!r} another")
            request["adapter"] = model
        assert self.model is not None
        return EngineRequest(request, request.get("adapter") or self.model, from_model)

    # ---- calls with retries ------------------------------------------------------------------
    def call(self, request: EngineRequest) -> Completion:
        """Run ``request`` from sync code, retrying an overloaded engine ``max_retries`` times."""
        for attempt in range(self.max_retries + 1):
            try:
                return self.runtime.generate(**request.kwargs)
            except EngineOverloadedError:
                if attempt == self.max_retries:
                    raise
                _sleep_sync(attempt)
            except InvalidRequestError as exc:
                raise _named_model(exc, request) from exc
        raise AssertionError("unreachable")

    async def acall(self, request: EngineRequest) -> Completion:
        """``call`` from any asyncio loop."""
        for attempt in range(self.max_retries + 1):
            try:
                return await self.runtime.agenerate(**request.kwargs)
            except EngineOverloadedError:
                if attempt == self.max_retries:
                    raise
                await _sleep_async(attempt)
            except InvalidRequestError as exc:
                raise _named_model(exc, request) from exc
        raise AssertionError("unreachable")

    def stream_chunks(self, request: EngineRequest) -> Iterator[StreamChunk]:
        """Stream ``request`` from sync code; an overloaded engine is retried before the first chunk only."""
        for attempt in range(self.max_retries + 1):
            started = False
            try:
                for chunk in self.runtime.stream(**request.kwargs):
                    started = True
                    yield chunk
                return
            except EngineOverloadedError:
                if started or attempt == self.max_retries:
                    raise
                _sleep_sync(attempt)
            except InvalidRequestError as exc:
                raise _named_model(exc, request) from exc

    async def astream_chunks(self, request: EngineRequest) -> AsyncIterator[StreamChunk]:
        """``stream_chunks`` from any asyncio loop (leaving early aborts the request)."""
        for attempt in range(self.max_retries + 1):
            started = False
            stream = self.runtime.astream(**request.kwargs)
            try:
                async for chunk in stream:
                    started = True
                    yield chunk
                return
            except EngineOverloadedError:
                if started or attempt == self.max_retries:
                    raise
                await _sleep_async(attempt)
            except InvalidRequestError as exc:
                raise _named_model(exc, request) from exc
            finally:
                await stream.aclose()  # type: ignore[attr-defined]


def _named_model(exc: InvalidRequestError, request: EngineRequest) -> InvalidRequestError:
    """An unknown adapter that came from ``model=`` is reported as a bad ``model``."""
    if request.adapter_from_model and str(exc).startswith("adapter: no adapter named"):
        return InvalidRequestError(f"model: {request.model_name!r} is neither the base model nor a loaded adapter "
                                   f"({exc})")
    return exc


def _backoff(attempt: int) -> float:
    return min(0.05 * 2.0**attempt, 1.0)


def _sleep_sync(attempt: int) -> None:
    import time

    time.sleep(_backoff(attempt))


async def _sleep_async(attempt: int) -> None:
    import asyncio

    await asyncio.sleep(_backoff(attempt))

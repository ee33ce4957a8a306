"""The submit pipeline on the event loop: check, tokenize (here or in a worker), admit, queue.

Everything that can be checked without tokens is checked first (``check``), so bad input
raises before anything is queued. Short prompts are tokenized on the loop; prompts over
``INLINE_CHARS`` in a worker thread with its own tokenizer (one at a time), so a long
document never stalls the loop and no tokenizer is shared between threads. ``enqueue``
then applies admission control and hands the request to the ``EngineLoop`` with no await in
between, so it is atomic with respect to other submits.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from kvloom.engine.messages import NewRequest
from kvloom.engine.prefix import PrefixHandle, check_prefix_adapter, prefix_token_ids
from kvloom.engine.prompts import Message, Prompt, PromptEncoder
from kvloom.errors import EngineOverloadedError, InvalidRequestError
from kvloom.params import SamplingParams
from kvloom.structured.spec import GrammarSpec
from kvloom.tools.request import ToolRequest

if TYPE_CHECKING:
    from kvloom.engine.build import EngineParts
    from kvloom.engine.loop import EngineLoop
    from kvloom.engine.prefix_registry import PrefixRegistry
    from kvloom.engine.streams import RequestStream
    from kvloom.lora.adapter import LoRAAdapter

Encoded = tuple[list[int], str | None]
"""A request's prompt token ids and its cache salt."""


@dataclass(slots=True)
class Submission:
    """A request checked before tokenizing: everything but its prompt."""

    request_id: str
    params: SamplingParams
    priority: int
    prefix: PrefixHandle | None
    cache_salt: str | None
    lora: LoRAAdapter | None
    arrival_time: float
    deadline: float | None
    tools: ToolRequest | None = None
    grammar_spec: GrammarSpec | None = None
    """The engine-built constraint (tool calls); None: ``params.response_format``, if any."""


def check_argument_types(
    request_id: object, priority: object, cache_salt: object, adapter: object, timeout: object,
    parallel_tool_calls: object,
) -> None:
    """The plain keyword arguments have the documented types (a wrong one would fail later, on
    the engine thread or with a bare ``TypeError``)."""
    for name, value in (("request_id", request_id), ("cache_salt", cache_salt), ("adapter", adapter)):
        if value is not None and not isinstance(value, str):
            raise InvalidRequestError(f"{name}: expected a string or None, got {type(value).__name__}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidRequestError(f"priority: expected an int, got {type(priority).__name__}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not math.isfinite(timeout)):
        raise InvalidRequestError(f"timeout: expected a finite number of seconds or None, got {timeout!r}")
    if not isinstance(parallel_tool_calls, bool):
        raise InvalidRequestError(f"parallel_tool_calls: expected a bool, got {type(parallel_tool_calls).__name__}")


def check_submission(
    parts: EngineParts, *, request_id: str | None, make_id: Callable[[], str], params: SamplingParams | None,
    priority: int = 0,
    prefix: PrefixHandle | None = None, cache_salt: str | None = None, adapter: str | None = None,
    timeout: float | None = None, request_timeout: float | None = None, tools: Sequence[Any] | None = None,
    tool_choice: Any = None, parallel_tool_calls: bool = True, has_messages: bool = False,
) -> Submission:
    """The one check of a request's arguments, for both facades (``AsyncEngine`` through
    ``Submitter.check``, ``LLM`` directly): types, params, grammar and tool specs, adapter,
    prefix/adapter agreement. Raises ``InvalidRequestError`` naming the field; the deadline
    (``timeout``, else ``request_timeout``) starts now. ``request_id`` None takes ``make_id()``."""
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError(f"params: expected SamplingParams, got {type(params).__name__}")
    check_argument_types(request_id, priority, cache_salt, adapter, timeout, parallel_tool_calls)
    if timeout is not None and not timeout > 0:
        raise InvalidRequestError(f"timeout: must be > 0 seconds, got {timeout!r}")
    parts.grammars.check(params)
    tool_request, spec = None, None
    if tools is not None:
        tool_request = ToolRequest.build(tools, tool_choice, parallel_tool_calls, parts.encoder.tool_call_format,
                                         has_messages, params.response_format is not None)
        spec = tool_request.grammar_spec()
        if spec is not None:
            parts.grammars.check_spec(spec, params.grammar_backend)
    elif tool_choice is not None:
        raise InvalidRequestError("tool_choice: given without `tools`")
    lora = parts.adapters.resolve_for_request(adapter)
    if prefix is not None:
        check_prefix_adapter(prefix, adapter, lora.content_hash if lora is not None else None)
    now = time.monotonic()
    timeout = timeout if timeout is not None else request_timeout
    return Submission(request_id if request_id is not None else make_id(), params, priority, prefix, cache_salt, lora, now,
                      now + timeout if timeout is not None else None, tool_request, spec)


def new_request(
    parts: EngineParts, sub: Submission, token_ids: list[int], cache_salt: str | None, *, pin_prefix: bool = False,
) -> NewRequest:
    """The engine thread's request for a checked, tokenized submission; its grammar (the
    response format or the tool-call constraint) starts compiling now, in the pool."""
    grammars = parts.grammars
    grammar = (grammars.submit_spec(sub.grammar_spec, sub.params.grammar_backend) if sub.grammar_spec is not None
               else grammars.submit(sub.params))
    return NewRequest(sub.request_id, token_ids, sub.params, sub.priority, sub.arrival_time, sub.deadline,
                      cache_salt, pin_prefix, grammar=grammar, lora=sub.lora, tools=sub.tools)


class Submitter:
    """Event-loop only (its worker encoder runs in one worker thread at a time)."""

    def __init__(
        self, parts: EngineParts, loop: EngineLoop, prefixes: PrefixRegistry, worker_encoder: PromptEncoder,
        max_waiting: int, request_timeout: float | None,
    ) -> None:
        self._parts = parts
        self._loop = loop
        self._prefixes = prefixes
        self._worker_encoder = worker_encoder
        self._worker_limiter = anyio.CapacityLimiter(1)
        self.max_waiting = max_waiting
        self.request_timeout = request_timeout
        self._encoding: set[str] = set()
        """Request ids reserved while their prompt is tokenized in the worker."""
        self._ids = itertools.count()

    @property
    def encoder(self) -> PromptEncoder:
        """The event loop's encoder."""
        return self._parts.encoder

    def check(
        self, params: SamplingParams | None, request_id: str | None, priority: int, prefix: PrefixHandle | None,
        cache_salt: str | None, adapter: str | None, timeout: float | None, tools: Sequence[Any] | None = None,
        tool_choice: Any = None, parallel_tool_calls: bool = True, has_messages: bool = False,
    ) -> Submission:
        """Everything that can be checked before tokenizing (``check_submission``, then what
        this loop adds: accepting, a live prefix handle, an id not in flight); the deadline starts now."""
        self._loop.check_accepting()
        if prefix is not None and not self._prefixes.is_live(prefix):
            raise InvalidRequestError("prefix: this handle was released, or belongs to another or a closed engine")
        sub = check_submission(
            self._parts, request_id=request_id, make_id=lambda: f"req-{next(self._ids)}", params=params,
            priority=priority, prefix=prefix, cache_salt=cache_salt, adapter=adapter, timeout=timeout,
            request_timeout=self.request_timeout, tools=tools, tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls, has_messages=has_messages,
        )
        if sub.request_id in self._loop.streams or sub.request_id in self._encoding:
            raise InvalidRequestError(f"request_id: {sub.request_id!r} is already in flight")
        return sub

    # ---- tokenizing ------------------------------------------------------------------------
    @staticmethod
    def is_long(prompt: Prompt | None, messages: Sequence[Message] | None) -> bool:
        return PromptEncoder.is_long(prompt, messages)

    @staticmethod
    def encode_with(
        encoder: PromptEncoder, sub: Submission, prompt: Prompt | None, messages: Sequence[Message] | None,
        add_generation_prompt: bool = True,
    ) -> Encoded:
        """Token ids and cache salt, validated (touches only ``encoder``'s tokenizer)."""
        if sub.prefix is not None:
            token_ids, salt = prefix_token_ids(sub.prefix, encoder, prompt, messages, sub.cache_salt, sub.tools)
        else:
            token_ids = encoder.to_token_ids(prompt, messages, add_generation_prompt, sub.tools)
            salt = sub.cache_salt
        encoder.validate(token_ids, sub.params)
        return token_ids, salt

    def reserve(self, request_id: str) -> None:
        """Hold ``request_id`` while its prompt is tokenized off the loop (see ``release``);
        idempotent."""
        self._encoding.add(request_id)

    def release(self, request_id: str) -> None:
        self._encoding.discard(request_id)

    async def encode(
        self, sub: Submission, prompt: Prompt | None, messages: Sequence[Message] | None,
        add_generation_prompt: bool = True,
    ) -> Encoded:
        """On the loop when short, else in the worker thread."""
        if not self.is_long(prompt, messages):
            return self.encode_with(self.encoder, sub, prompt, messages, add_generation_prompt)
        worker = self._worker_encoder
        return await anyio.to_thread.run_sync(
            lambda: self.encode_with(worker, sub, prompt, messages, add_generation_prompt),
            limiter=self._worker_limiter,
        )

    async def encode_and_enqueue(
        self, sub: Submission, prompt: Prompt | None, messages: Sequence[Message] | None,
        add_generation_prompt: bool = True, pin_prefix: bool = False,
    ) -> RequestStream:
        self.reserve(sub.request_id)
        try:
            encoded = await self.encode(sub, prompt, messages, add_generation_prompt)
        finally:
            self.release(sub.request_id)
        return self.enqueue(sub, *encoded, messages, pin_prefix=pin_prefix)

    # ---- queueing --------------------------------------------------------------------------
    def enqueue(
        self, sub: Submission, token_ids: list[int], cache_salt: str | None, messages: Sequence[Message] | None,
        *, pin_prefix: bool = False,
    ) -> RequestStream:
        """Admission control, then hand the request to the loop (no await: atomic on the loop)."""
        loop = self._loop
        loop.check_accepting()  # again: a worker-thread tokenize may have outlived the engine
        if sub.request_id in loop.streams:
            raise InvalidRequestError(f"request_id: {sub.request_id!r} is already in flight")
        waiting = loop.num_submitted + (loop.last.snapshot.num_waiting if loop.last is not None else 0)
        if waiting >= self.max_waiting:
            raise EngineOverloadedError(f"{waiting} sequences are waiting (max_waiting={self.max_waiting})")
        if sub.prefix is not None:
            sub.prefix.hits += 1
        elif messages is not None:
            self._prefixes.count_message_hits(messages, cache_salt)
        return loop.submit(new_request(self._parts, sub, token_ids, cache_salt, pin_prefix=pin_prefix))

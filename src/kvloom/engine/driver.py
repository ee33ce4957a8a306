"""The engine thread's side: apply new and aborted requests, step the core, detokenize.

Everything here runs on the one thread that owns the core (``LLM``'s caller, or the
``AsyncEngine``'s worker); requests cross over only as the plain data below.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvloom.engine.core import EngineCore
from kvloom.engine.output_processor import OutputProcessor, SequenceDelta, child_request_ids
from kvloom.errors import GrammarError, InvalidRequestError
from kvloom.kv_cache.block_pool import BlockId
from kvloom.kv_cache.hashing import extra_keys
from kvloom.kv_cache.manager import KVCacheStats
from kvloom.outputs import Completion
from kvloom.params import SamplingParams
from kvloom.scheduler.request import Request
from kvloom.structured.processor import LogitsProcessor

if TYPE_CHECKING:
    from kvloom.lora.adapter import LoRAAdapter
    from kvloom.structured.compiler import CompiledGrammar

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class NewRequest:
    """A validated request on its way to the core."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    arrival_time: float
    cache_salt: str | None = None
    pin_prefix: bool = False
    """When it finishes, pin the whole cached blocks of its prompt (a prefix handle)."""
    grammar: Future[CompiledGrammar] | None = None
    """Its ``response_format``, compiling: the request waits in the driver until it is ready."""
    lora: LoRAAdapter | None = None
    """Its LoRA adapter (None: the base model)."""
    submitted: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class StepResult:
    deltas: list[SequenceDelta]
    finished: list[Completion]
    aborted: list[Completion]
    """Partial results of the requests aborted this step."""
    pinned: dict[str, list[int]]
    """Request id -> blocks pinned for it (``pin_prefix`` requests that finished this step)."""
    failed: list[tuple[str, InvalidRequestError]]
    """Requests that failed before running (their grammar did not compile, a processor
    factory raised), with the error for their caller."""
    has_unfinished: bool
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    kv_stats: KVCacheStats
    processor_time_s: float = 0.0
    """Total time in logits processors so far (grammar masks and accepts)."""
    num_constrained_steps: int = 0
    """Steps so far in which some sequence had a logits processor."""


class EngineDriver:
    """Owns the core and the output processor. Not thread-safe: one thread at a time."""

    def __init__(self, core: EngineCore, tokenizer: Any | None, grammar_timeout: float = 60.0) -> None:
        self.core = core
        self.outputs = OutputProcessor(tokenizer)
        self.grammar_timeout = grammar_timeout
        self._eos = frozenset(core.model_config.eos_token_ids)
        self._to_pin: dict[str, NewRequest] = {}
        self._awaiting_grammar: dict[str, NewRequest] = {}
        self._failed: list[tuple[str, InvalidRequestError]] = []

    def add(self, req: NewRequest) -> None:
        """Register a request; it reaches the scheduler now, or once its grammar has compiled."""
        self.outputs.add_request(req.request_id, req.prompt_token_ids, req.params, req.arrival_time)
        if req.pin_prefix:
            self._to_pin[req.request_id] = req
        if req.grammar is not None and not req.grammar.done():
            self._awaiting_grammar[req.request_id] = req
        else:
            self._enqueue(req)

    def _enqueue(self, req: NewRequest) -> None:
        seq_ids = child_request_ids(req.request_id, req.params.n)
        try:
            grammar = req.grammar.result() if req.grammar is not None else None
            # Each sequence gets its own processors (grammar state is per sequence).
            processors = [self._make_processors(req.params, grammar) for _ in seq_ids]
        except Exception as exc:
            self._fail(req.request_id, exc)
            return
        for i, seq_id in enumerate(seq_ids):
            params = req.params.for_choice(i) if req.params.n > 1 else req.params
            self.core.add_request(
                Request(seq_id, list(req.prompt_token_ids), params, self._eos, req.priority, req.arrival_time,
                        cache_salt=req.cache_salt, fork_of=seq_ids[0] if i > 0 else None,
                        processors=processors[i], lora=req.lora)
            )

    @staticmethod
    def _make_processors(params: SamplingParams, grammar: CompiledGrammar | None) -> list[LogitsProcessor]:
        processors = [grammar.new_processor()] if grammar is not None else []
        for factory in params.logits_processors:
            proc = factory()
            if not isinstance(proc, LogitsProcessor):
                raise InvalidRequestError(
                    f"logits_processors: {factory!r} returned {type(proc).__name__}, not a LogitsProcessor"
                )
            processors.append(proc)
        return processors

    def _fail(self, request_id: str, exc: BaseException) -> None:
        self._to_pin.pop(request_id, None)
        self.outputs.abort(request_id)
        if isinstance(exc, InvalidRequestError):
            error = exc
        else:
            error = InvalidRequestError(f"logits_processors: creating a processor failed: {exc!r}")
            error.__cause__ = exc
        self._failed.append((request_id, error))

    def _poll_grammars(self) -> None:
        """Queue the requests whose grammar is ready, fail those that failed or timed out.
        With nothing else to run, wait briefly for a compile instead of spinning."""
        if not self._awaiting_grammar:
            return
        if not self.core.has_unfinished():
            futures = [r.grammar for r in self._awaiting_grammar.values() if r.grammar is not None]
            concurrent.futures.wait(futures, timeout=0.01, return_when=concurrent.futures.FIRST_COMPLETED)
        now = time.monotonic()
        for rid, req in list(self._awaiting_grammar.items()):
            assert req.grammar is not None
            if req.grammar.done():
                del self._awaiting_grammar[rid]
                self._enqueue(req)
            elif now - req.submitted > self.grammar_timeout:
                del self._awaiting_grammar[rid]
                self._fail(rid, GrammarError(
                    f"response_format: the grammar did not compile within grammar_compile_timeout="
                    f"{self.grammar_timeout:g}s"))

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished() or bool(self._awaiting_grammar)

    def abort(self, request_id: str) -> Completion | None:
        """Forget a request wherever it is (its blocks are freed at once); returns what it had
        produced, or None if it was unknown or already finished."""
        self._to_pin.pop(request_id, None)
        self._awaiting_grammar.pop(request_id, None)
        seq_ids, partial = self.outputs.abort(request_id)
        self.core.finish_requests(seq_ids, "abort")
        return partial

    def run(
        self, adds: list[NewRequest], aborts: list[str], unpins: Sequence[list[int]] = (),
        pinned_loras: Sequence[LoRAAdapter] | None = None,
    ) -> StepResult:
        """Apply the hand-offs (adds first, so an abort can follow its add), then one step if
        there is work. ``pinned_loras``, when given, replaces the set of pinned adapters."""
        if pinned_loras is not None:
            self.core.scheduler.pinned_loras = {a.content_hash for a in pinned_loras}
            self.core.runner.set_pinned_loras(list(pinned_loras))
        for block_ids in unpins:
            self.core.kv.unpin([BlockId(b) for b in block_ids])
        for req in adds:
            self.add(req)
        aborted = [c for c in (self.abort(rid) for rid in aborts) if c is not None]
        self._poll_grammars()
        deltas: list[SequenceDelta] = []
        finished: list[Completion] = []
        if self.core.has_unfinished():
            processed = self.outputs.process(self.core.step())
            if processed.stop_string_hits:
                self.core.finish_requests(processed.stop_string_hits, "stop")
            deltas, finished = processed.deltas, processed.finished
        pinned: dict[str, list[int]] = {}
        for completion in finished:
            pin = self._to_pin.pop(completion.request_id, None)
            if pin is not None:  # same thread, no allocation since its blocks were freed: all still cached
                lora_hash = pin.lora.content_hash if pin.lora is not None else None
                blocks = self.core.kv.pin(pin.prompt_token_ids, extra_keys(pin.cache_salt, lora_hash))
                pinned[pin.request_id] = [int(b) for b in blocks]
        sched = self.core.scheduler
        kv = self.core.kv
        return StepResult(
            deltas=deltas,
            finished=finished,
            aborted=aborted,
            pinned=pinned,
            failed=self._take_failed(),
            has_unfinished=self.has_unfinished(),
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            kv_blocks_used=kv.num_blocks - kv.num_free_blocks,
            kv_blocks_total=kv.num_blocks,
            num_preemptions=sched.num_preemptions,
            kv_stats=kv.stats(),
            processor_time_s=self.core.runner.processor_time_s,
            num_constrained_steps=self.core.runner.num_constrained_steps,
        )

    def _take_failed(self) -> list[tuple[str, InvalidRequestError]]:
        failed, self._failed = self._failed, []
        return failed

"""The engine thread's side: apply a ``StepInput`` through the core, step, detokenize.

Everything here runs on the one thread that owns the core (``LLM``'s caller, or the
``AsyncEngine``'s worker); requests cross over only as the plain data of ``messages``.
Besides the core, the driver owns what the core does not know about: requests waiting for
their grammar to compile, per-request deadlines, and the output processor (detokenizer,
stop strings, ``n`` choices).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import TYPE_CHECKING, Any

from kvloom.engine.core import CoreStepResult, EngineCore
from kvloom.engine.messages import EngineSnapshot, NewRequest, RequestFailure, StepInput, StepOutput
from kvloom.engine.output_processor import OutputProcessor, ProcessedOutputs, child_request_ids
from kvloom.errors import EngineError, GrammarError, InvalidRequestError
from kvloom.outputs import Completion
from kvloom.params import SamplingParams
from kvloom.scheduler.request import Request
from kvloom.structured.logits_processor import LogitsProcessor

if TYPE_CHECKING:
    from kvloom.structured.compiler import CompiledGrammar

logger = logging.getLogger(__name__)


class EngineDriver:
    """Owns the core and the output processor. Not thread-safe: one thread at a time.

    Invariant: a parent request id is known to the output processor from ``add`` until it
    ends (finished, aborted, timed out or failed), and then appears in exactly one list of
    the ``StepOutput`` that ends it.
    """

    def __init__(self, core: EngineCore, tokenizer: Any | None, grammar_timeout: float = 60.0) -> None:
        self.core = core
        self.outputs = OutputProcessor(tokenizer)
        self.grammar_timeout = grammar_timeout
        self._eos = frozenset(core.model_config.eos_token_ids)
        self._awaiting_grammar: dict[str, NewRequest] = {}
        self._deadlines: dict[str, float] = {}
        self._failed: list[RequestFailure] = []
        self._num_timeouts = 0

    # ---- requests in -----------------------------------------------------------------------
    def add(self, req: NewRequest) -> None:
        """Register a request; it reaches the scheduler now, or once its grammar has compiled."""
        self.outputs.add_request(req.request_id, req.prompt_token_ids, req.params, req.arrival_time, req.tools)
        if req.deadline is not None:
            self._deadlines[req.request_id] = req.deadline
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
            for i, seq_id in enumerate(seq_ids):
                params = req.params.for_choice(i) if req.params.n > 1 else req.params
                self.core.add_request(
                    Request(seq_id, list(req.prompt_token_ids), params, self._eos, req.priority, req.arrival_time,
                            cache_salt=req.cache_salt, fork_of=seq_ids[0] if i > 0 else None,
                            processors=processors[i], lora=req.lora, pin_prefix=req.pin_prefix)
                )
        except Exception as exc:
            self._fail(req.request_id, exc)

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
        """End a request with an error: forget it everywhere (its blocks are freed at once)."""
        self.abort(request_id)
        if isinstance(exc, InvalidRequestError):
            error = exc
        else:
            error = InvalidRequestError(f"logits_processors: creating a processor failed: {exc!r}")
            error.__cause__ = exc
        self._failed.append(RequestFailure(request_id, error))

    def abort(self, request_id: str) -> Completion | None:
        """Forget a request wherever it is (its blocks are freed at once); returns what it had
        produced, or None if it was unknown or already finished."""
        self._awaiting_grammar.pop(request_id, None)
        self._deadlines.pop(request_id, None)
        seq_ids, partial = self.outputs.abort(request_id)
        self.core.finish_requests(seq_ids, "abort")
        return partial

    # ---- waiting rooms -----------------------------------------------------------------------
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
            elif now - req.arrival_time > self.grammar_timeout:
                self._fail(rid, GrammarError(
                    f"response_format: the grammar did not compile within grammar_compile_timeout="
                    f"{self.grammar_timeout:g}s"))

    def _expire(self) -> list[Completion]:
        """Abort every request whose deadline has passed (queued, compiling or running)."""
        if not self._deadlines:
            return []
        now = time.monotonic()
        expired = [rid for rid, deadline in self._deadlines.items() if now >= deadline]
        timed_out = [c for c in (self.abort(rid) for rid in expired) if c is not None]
        self._num_timeouts += len(timed_out)
        return timed_out

    def _fail_unrunnable(self, errors: dict[str, InvalidRequestError]) -> None:
        """End the requests the core found can never run (``CoreStepResult.unrunnable``, or after an
        adapter pin change): waiting for what they need could be waiting forever. A request fails
        once, with its first sequence's error, however many of its sequences are stuck."""
        for seq_id, error in errors.items():
            seq = self.outputs.seqs.get(seq_id)
            if seq is not None:  # its siblings are gone once the first fails (and unknown ids are ignored)
                self._fail(seq.parent_id, error)

    # ---- one hand-off ------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.core.has_unfinished() or bool(self._awaiting_grammar)

    def run(self, step_input: StepInput) -> StepOutput:
        """The hand-off: apply ``step_input``, step the core if there is work, report both."""
        aborted = self._apply(step_input)
        timed_out = self._expire()
        self._poll_grammars()
        result = self.core.step() if self.core.has_unfinished() else CoreStepResult()
        processed = self._process(result)
        failed, self._failed = self._failed, []
        return StepOutput(self._snapshot(), self.has_unfinished(), processed.deltas, processed.finished, aborted,
                          timed_out, result.pinned, failed)

    def _apply(self, step_input: StepInput) -> list[Completion]:
        """Adapter pins, unpins, adds, then aborts (``StepInput``'s order); returns what the aborted
        requests had produced."""
        if step_input.pinned_adapters is not None:
            self._fail_unrunnable(self.core.set_pinned_adapters(step_input.pinned_adapters))
        for block_ids in step_input.unpins:
            self.core.unpin_prefix(block_ids)
        for req in step_input.adds:
            self.add(req)
        return [c for c in (self.abort(rid) for rid in step_input.aborts) if c is not None]

    def _process(self, result: CoreStepResult) -> ProcessedOutputs:
        """Detokenize a step's outputs; end the sequences a stop string stopped, the requests whose
        output failed to process and those the core found can never run."""
        processed = self.outputs.process(result.outputs)
        if processed.stop_string_hits:
            self.core.finish_requests(processed.stop_string_hits, "stop")
        for parent_id, exc in processed.failed.items():
            self.abort(parent_id)
            error = EngineError(f"request {parent_id!r}: processing its output failed: {exc!r}")
            error.__cause__ = exc
            self._failed.append(RequestFailure(parent_id, error))
        for completion in processed.finished:
            self._deadlines.pop(completion.request_id, None)
        self._fail_unrunnable(result.unrunnable)
        return processed

    def _snapshot(self) -> EngineSnapshot:
        waiting_grammar = sum(r.params.n for r in self._awaiting_grammar.values())
        return EngineSnapshot(
            num_running=self.core.num_running,
            num_waiting=self.core.num_waiting + waiting_grammar,
            num_preemptions=self.core.num_preemptions,
            num_timeouts=self._num_timeouts,
            kv_stats=self.core.kv_cache_stats(),
            processor_time_s=self.core.processor_time_s,
            num_constrained_steps=self.core.num_constrained_steps,
            constrained_step_times=self.core.constrained_step_times.sample(),
        )

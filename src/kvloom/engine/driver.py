"""The engine thread's side: apply new and aborted requests, step the core, detokenize.

Everything here runs on the one thread that owns the core (``LLM``'s caller, or the
``AsyncEngine``'s worker); requests cross over only as the plain data below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvloom.engine.core import EngineCore
from kvloom.engine.output_processor import OutputProcessor, SequenceDelta
from kvloom.kv_cache.block_pool import BlockId
from kvloom.kv_cache.hashing import extra_keys
from kvloom.kv_cache.manager import KVCacheStats
from kvloom.outputs import Completion
from kvloom.params import SamplingParams
from kvloom.scheduler.request import Request


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


@dataclass(slots=True)
class StepResult:
    deltas: list[SequenceDelta]
    finished: list[Completion]
    aborted: list[Completion]
    """Partial results of the requests aborted this step."""
    pinned: dict[str, list[int]]
    """Request id -> blocks pinned for it (``pin_prefix`` requests that finished this step)."""
    has_unfinished: bool
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    kv_stats: KVCacheStats


class EngineDriver:
    """Owns the core and the output processor. Not thread-safe: one thread at a time."""

    def __init__(self, core: EngineCore, tokenizer: Any | None) -> None:
        self.core = core
        self.outputs = OutputProcessor(tokenizer)
        self._eos = frozenset(core.model_config.eos_token_ids)
        self._to_pin: dict[str, NewRequest] = {}

    def add(self, req: NewRequest) -> None:
        seq_ids = self.outputs.add_request(req.request_id, req.prompt_token_ids, req.params, req.arrival_time)
        for i, seq_id in enumerate(seq_ids):
            params = req.params.for_choice(i) if req.params.n > 1 else req.params
            self.core.add_request(
                Request(seq_id, list(req.prompt_token_ids), params, self._eos, req.priority, req.arrival_time,
                        cache_salt=req.cache_salt, fork_of=seq_ids[0] if i > 0 else None)
            )
        if req.pin_prefix:
            self._to_pin[req.request_id] = req

    def abort(self, request_id: str) -> Completion | None:
        """Forget a request wherever it is (its blocks are freed at once); returns what it had
        produced, or None if it was unknown or already finished."""
        self._to_pin.pop(request_id, None)
        seq_ids, partial = self.outputs.abort(request_id)
        self.core.finish_requests(seq_ids, "abort")
        return partial

    def run(self, adds: list[NewRequest], aborts: list[str], unpins: Sequence[list[int]] = ()) -> StepResult:
        """Apply the hand-offs (adds first, so an abort can follow its add), then one step if
        there is work."""
        for block_ids in unpins:
            self.core.kv.unpin([BlockId(b) for b in block_ids])
        for req in adds:
            self.add(req)
        aborted = [c for c in (self.abort(rid) for rid in aborts) if c is not None]
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
                blocks = self.core.kv.pin(pin.prompt_token_ids, extra_keys(pin.cache_salt))
                pinned[pin.request_id] = [int(b) for b in blocks]
        sched = self.core.scheduler
        kv = self.core.kv
        return StepResult(
            deltas=deltas,
            finished=finished,
            aborted=aborted,
            pinned=pinned,
            has_unfinished=self.core.has_unfinished(),
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            kv_blocks_used=kv.num_blocks - kv.num_free_blocks,
            kv_blocks_total=kv.num_blocks,
            num_preemptions=sched.num_preemptions,
            kv_stats=kv.stats(),
        )

"""The scheduler's record of one request (one sequence: ``n > 1`` is fanned out above).

Owned by the scheduler, on the engine thread. Nothing of it crosses to the runner but copies
(``NewRequestData`` once, ``CachedRequestData`` after) and its processors, whose ownership moves.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvloom.kv_cache.hashing import extra_keys
from kvloom.outputs import FinishReason
from kvloom.params import SamplingParams
from kvloom.structured.logits_processor import LogitsProcessor

if TYPE_CHECKING:
    from kvloom.lora.adapter import LoRAAdapter


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True, eq=False)
class Request:
    """Token-level state. ``token_ids`` is the prompt followed by the outputs so far.

    Invariants: ``0 <= num_computed_tokens <= num_tokens``; KV exists in the cache for the
    first ``num_computed_tokens`` tokens. Steps scheduled and not yet reported (``update``) compute
    the next ``num_inflight_tokens`` positions and sample ``num_pending`` tokens not yet in
    ``token_ids``: ``num_computed_tokens + num_inflight_tokens <= num_tokens + num_pending``.
    Both are 0 whenever no step is in flight.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    cache_salt: str | None = None
    """Requests with different salts never share cached KV."""
    fork_of: str | None = None
    """Choice i > 0 of an ``n > 1`` request: waits for this request's prompt, then shares its blocks."""
    processors: list[LogitsProcessor] = field(default_factory=list)
    """This sequence's own logits processors (grammar first), until its first schedule moves them
    to the runner (``NewRequestData.processors``); empty from then on. The scheduler never calls them."""
    lora: LoRAAdapter | None = None
    """The adapter it runs with (the object, not its name: unloading or reloading the name
    never changes a request in flight)."""
    lora_skips: int = 0
    """Steps it waited because ``max_loras`` other adapters were running (see ``AdapterAdmission``)."""
    num_inflight_tokens: int = 0
    """Positions scheduled in steps whose results ``update`` has not yet applied."""
    num_pending: int = 0
    """Tokens those steps sample for it (at most one a step): known on the device, not yet here."""
    pin_prefix: bool = False
    """When it finishes, pin the whole cached blocks of its prompt before freeing its own
    (a prefix handle's request; see ``Scheduler.update``)."""

    @property
    def cache_keys(self) -> tuple[object, ...]:
        """Extra keys of this request's block hashes."""
        return extra_keys(self.cache_salt, self.lora.content_hash if self.lora is not None else None)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def at_length(self, max_model_len: int, pending: int = 0) -> bool:
        """Whether it has reached ``max_tokens`` or the model's length, counting ``pending`` tokens
        sampled by steps in flight as its own."""
        return (self.num_output_tokens + pending >= self.params.max_tokens
                or self.num_tokens + pending >= max_model_len)

    def stop_reason_after(self, token_id: int, max_model_len: int) -> FinishReason | None:
        """Why generation ends after ``token_id`` was appended, or None to go on."""
        num_out = self.num_output_tokens
        if num_out >= self.params.min_tokens:
            if not self.params.ignore_eos and token_id in self.eos_token_ids:
                return "stop"
            if token_id in self.params.stop_token_ids:
                return "stop"
        if self.at_length(max_model_len):
            return "length"
        return None

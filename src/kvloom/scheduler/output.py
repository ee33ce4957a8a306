"""Hand-offs between the scheduler and the model runner, and the scheduler's report of a step.

What crosses to the runner is plain data (ids, token counts, block ids) with two documented
exceptions, both in ``NewRequestData`` and both sent once, at a request's first schedule:

- ``processors``: live, stateful logits processors (grammar matchers, user processors). Their
  ownership *moves* with the record: the scheduler drops its reference when it builds it
  (``Request.processors`` is empty from then on), and only the runner calls them.
- ``lora``: the request's ``LoRAAdapter``, immutable (frozen weights and hash), shared read-only.

After that first schedule the runner hears about a request only through ``CachedRequestData``
(new block ids and a computed-token count), its ``num_scheduled_tokens`` entry and, at its end,
``finished_req_ids``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvloom.outputs import FinishReason, TokenLogprob
from kvloom.params import SamplingParams
from kvloom.structured.logits_processor import LogitsProcessor

if TYPE_CHECKING:
    from kvloom.lora.adapter import LoRAAdapter


@dataclass(slots=True)
class NewRequestData:
    """A request the runner has not seen: sent once, at its first schedule (a fork's first step
    included). The runner builds its own state from it and keeps it until the request finishes,
    across preemptions."""

    req_id: str
    token_ids: list[int]
    """Prompt tokens, then any output tokens it already has (a copy: the scheduler keeps its own)."""
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    """The request's whole block table after this step's allocation."""
    num_computed_tokens: int
    """Tokens whose KV is already in the cache (the step computes from here)."""
    processors: list[LogitsProcessor] = field(default_factory=list)
    """The sequence's logits processors; they have accepted every output token in ``token_ids``.
    Ownership moves to the runner with this record (see the module docstring)."""
    lora: LoRAAdapter | None = None
    """Its LoRA adapter (immutable, shared read-only), or None for the base model."""


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner already holds state for: only what changed."""

    req_id: str
    new_block_ids: list[int]
    """Blocks appended to its table this step; the whole table when ``resumed``."""
    num_computed_tokens: int
    """Tokens whose KV is in the cache before this step (0 on resumption without a cached prefix)."""
    resumed: bool
    """Coming back after preemption: its KV is gone and its table is replaced."""


class Unrunnable(enum.Enum):
    """Why a waiting request can never start as things stand: the engine ends it with an error
    rather than let it wait for something that may never happen."""

    BESIDE_PINNED_PREFIXES = enum.auto()
    """Nothing else runs and it still cannot get its blocks: what holds the pool is blocks pinned
    by prefix handles, which stay until the application releases them."""
    ADAPTER_SLOTS_PINNED = enum.auto()
    """Its adapter is not pinned and every one of the ``max_loras`` slots is pinned to another."""


@dataclass(slots=True)
class SchedulerOutput:
    """What to run in one step (for the runner), and what the scheduler found (for the engine)."""

    new_reqs: list[NewRequestData]
    """Requests scheduled for the first time (the runner creates their state)."""
    cached_reqs: list[CachedRequestData]
    """Requests the runner already holds, scheduled again."""
    num_scheduled_tokens: dict[str, int]
    """Request id -> tokens to compute this step (1 for a decode, a chunk for a prefill); in
    scheduling order, every id in exactly one of ``new_reqs`` and ``cached_reqs``."""
    total_num_scheduled_tokens: int
    """``sum(num_scheduled_tokens.values())``, at most ``max_num_batched_tokens``."""
    finished_req_ids: set[str]
    """Requests that ended since the last step: the runner drops their state."""
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) block copies to apply before the forward (forks, copy-on-write)."""
    step_id: int = 0
    """The scheduler's number for this step: ``update`` finds the requests it scheduled by it (an id may
    be reused by a new request while the step is in flight)."""
    unrunnable: dict[str, Unrunnable] = field(default_factory=dict)
    """Waiting requests found unable to ever start, and why (for the engine, not the runner): they
    stay queued until the engine ends them."""

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(slots=True)
class SampledTokens:
    """What the runner sampled: one token for each request that reached its last known token."""

    req_ids: list[str]
    token_ids: list[int]
    logprobs: list[TokenLogprob | None] | None = None
    """Aligned with ``req_ids`` when any request in the step asked for logprobs (else None)."""
    finish_reasons: dict[str, FinishReason] = field(default_factory=dict)
    """Requests their logits processors ended this step: ``stop`` (a grammar completed) or
    ``error`` (a processor rejected the token or raised)."""


@dataclass(slots=True)
class EngineCoreOutput:
    """One request's progress after a step: new tokens and, at the end, why it finished."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    pinned_block_ids: list[int] | None = None
    """For a finished ``pin_prefix`` request: the blocks now pinned for its prompt (the caller
    owns the pin and must unpin them)."""

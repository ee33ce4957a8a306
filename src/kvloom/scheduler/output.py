"""Hand-offs between the scheduler and the model runner: plain data, never live requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvloom.outputs import FinishReason, TokenLogprob
from kvloom.params import SamplingParams
from kvloom.structured.logits_processor import LogitsProcessor

if TYPE_CHECKING:
    from kvloom.lora.adapter import LoRAAdapter


@dataclass(slots=True)
class NewRequestData:
    """A request the runner has not seen: sent once, when first scheduled."""

    req_id: str
    token_ids: list[int]
    """Prompt tokens (plus any outputs, for a request the runner had already dropped)."""
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    """The request's whole block table after this step's allocation."""
    num_computed_tokens: int
    """Tokens whose KV is already in the cache (the step computes from here)."""
    processors: list[LogitsProcessor] = field(default_factory=list)
    """The sequence's logits processors; they have accepted every output token in ``token_ids``."""
    lora: LoRAAdapter | None = None
    """Its LoRA adapter, or None for the base model."""


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner already holds state for: only what changed."""

    req_id: str
    new_block_ids: list[int]
    """Blocks appended to its table this step; the whole table when ``resumed``."""
    num_computed_tokens: int
    resumed: bool
    """Coming back after preemption: its KV is gone and its table is replaced."""


@dataclass(slots=True)
class SchedulerOutput:
    """What to run in one step."""

    new_reqs: list[NewRequestData]
    cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    """Request id -> tokens to compute this step (1 for a decode, a chunk for a prefill)."""
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]
    """Requests that ended since the last step: the runner drops their state."""
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) block copies to apply before the forward (forks, copy-on-write)."""
    step_id: int = 0
    """The scheduler's number for this step: ``update`` finds the requests it scheduled by it (an id may
    be reused by a new request while the step is in flight)."""

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

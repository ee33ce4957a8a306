"""The runner's own copy of each request's state: tokens, block table, sampling RNG.

Built from a ``NewRequestData`` at the request's first schedule (taking over its processors),
kept across steps (and across preemption, so a seeded request's generator continues where it
was), dropped when ``finished_req_ids`` names it; updated only from ``SchedulerOutput`` deltas
and from the tokens the runner samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvloom.params import SamplingParams
from kvloom.structured.logits_processor import LogitsProcessor

if TYPE_CHECKING:
    from kvloom.lora.adapter import LoRAAdapter


PENDING_TOKEN = -1
"""In ``CachedRequestState.token_ids``: a token a step in flight samples (scheduling ahead). Its
value is on the device until the runner collects that step; inputs read it from there."""


@dataclass(slots=True, eq=False)
class CachedRequestState:
    """One sequence as the runner sees it. Owned by the runner: nothing else holds it."""

    req_id: str
    token_ids: list[int]
    """Prompt then outputs; the runner appends each token it samples (a ``PENDING_TOKEN`` when it
    launches the sampling, the token when it collects it)."""
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None
    """Per-request RNG for seeded sampling; None uses the engine's shared generator."""
    processors: list[LogitsProcessor] = field(default_factory=list)
    """Logits processors (grammar first), run on every token this sequence samples; the runner
    owns them (the scheduler handed them over in ``NewRequestData``)."""
    lora: LoRAAdapter | None = None
    """Its LoRA adapter; None: the base model."""

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen

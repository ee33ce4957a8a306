"""Which LoRA adapters may run side by side: at most ``max_loras`` distinct adapters in a step.

Newly admitted requests keep the running adapters plus the pinned ones within ``max_loras``
distinct adapters. A waiting request whose adapter would exceed that is skipped so requests
behind it for resident adapters (or the base model) can go; once it has been skipped
``MAX_LORA_SKIPS`` times it blocks the queue instead, so it cannot starve. Pinning never
preempts: a request already running on an unpinned adapter keeps its slot until it ends (the
runner makes the pinned adapters resident as slots allow). A request on an unpinned adapter
while every slot is pinned to others could never run: ``set_pinned`` returns those so the
engine fails them instead of letting them block the queue.

Adapters are named by content hash here: the scheduler never sees adapter weights or slots.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from kvloom.scheduler.output import Unrunnable
from kvloom.scheduler.request import Request

MAX_LORA_SKIPS = 32
"""Steps a waiting request may be passed over for its adapter before it blocks the queue."""


class AdapterFit(enum.Enum):
    """What a step's admission does with the head of the waiting queue, as far as adapters go."""

    FITS = enum.auto()
    """The base model, an adapter already in the step, or a free adapter slot: admit it if its blocks fit."""
    SKIP = enum.auto()
    """Its adapter would exceed ``max_loras``: pass it over, the requests behind it may go."""
    BLOCK = enum.auto()
    """Passed over more than ``MAX_LORA_SKIPS`` times: admit nobody behind it this step."""


@dataclass(slots=True)
class StepAdapters:
    """The adapters one ``schedule`` call has in use so far: the running and pinned ones, then
    each admitted request's. Lives for that call only.

    Invariant: given only requests ``check`` said FITS, ``add`` brings in a new adapter only while
    fewer than ``max_loras`` are in use, so admission never takes a step past ``max_loras`` (the
    running and pinned ones alone may be past it: pinning never preempts)."""

    in_use: set[str]
    """Content hashes of the adapters the step runs, pinned ones included."""
    max_loras: int

    def check(self, req: Request) -> AdapterFit:
        """Whether ``req``'s adapter fits beside ``in_use``; counts a skip on ``req`` when not."""
        if req.lora is None or req.lora.content_hash in self.in_use or len(self.in_use) < self.max_loras:
            return AdapterFit.FITS
        req.lora_skips += 1
        return AdapterFit.BLOCK if req.lora_skips > MAX_LORA_SKIPS else AdapterFit.SKIP

    def add(self, req: Request) -> None:
        """``req`` was admitted: its adapter is in use for the rest of the step."""
        if req.lora is not None:
            self.in_use.add(req.lora.content_hash)


class AdapterAdmission:
    """The pinned adapters and the ``max_loras`` limit on the adapters in one step.

    Owned by the ``Scheduler`` (engine thread only); it holds no requests, only the pins, and
    reads the requests the scheduler hands it. The pins mirror the runner's (the engine sets
    both): a pinned adapter always counts as in use, so it keeps its slot."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.pinned: set[str] = set()
        """Content hashes of the pinned adapters (they keep a slot; see ``set_pinned``)."""

    def can_serve(self, content_hash: str | None) -> bool:
        """Whether a request on this adapter (None: the base model) can ever get a slot with
        the current pins."""
        return content_hash is None or content_hash in self.pinned or len(self.pinned) < self.max_loras

    def set_pinned(self, content_hashes: set[str], waiting: Iterable[Request]) -> dict[str, Unrunnable]:
        """Replace the pinned adapters; returns those of the ``waiting`` requests that can no longer
        ever run (their adapter is unpinned and every slot is pinned to another). They stay queued
        until the engine ends them."""
        self.pinned = set(content_hashes)
        return {r.request_id: Unrunnable.ADAPTER_SLOTS_PINNED for r in waiting
                if not self.can_serve(r.lora.content_hash if r.lora is not None else None)}

    def for_step(self, running: Iterable[Request]) -> StepAdapters:
        """A step's adapter check, starting from the ``running`` requests' adapters and the pinned ones."""
        in_use = {r.lora.content_hash for r in running if r.lora is not None} | self.pinned
        return StepAdapters(in_use, self.max_loras)

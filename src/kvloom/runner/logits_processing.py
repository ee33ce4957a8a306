"""Drive the sequences' logits processors around the sampler.

One ``int32`` bitmask ``[B, ceil(V / 32)]`` for the whole batch is filled by the bitmask
processors (grammars) of the rows that have one (``fill_masks``: it needs only the tokens
accepted so far, so the runner runs it on a helper thread while the forward runs) and, before
sampling, applied to those rows only, in one call; then each processor's ``process_logits``
edits its row (engine thread). After sampling, every
processor accepts its row's token. Rows without processors cost nothing, and a step with
no processors at all never allocates the bitmask.

A processor that raises, or rejects the sampled token, ends only its own sequence (finish
reason ``error``; the exception is logged); a processor that reports ``is_terminated`` ends
its sequence with ``stop``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from kvloom.outputs import FinishReason
from kvloom.runner.state import CachedRequestState
from kvloom.structured.bitmask import allocate_bitmask, apply_bitmask

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class FilledMasks:
    """A batch's grammar bitmask, filled ahead of its logits."""

    bitmask: torch.Tensor | None
    """``[B, ceil(V / 32)]`` int32 on the host; ``None`` when no row has a bitmask processor."""
    rows: list[int] = field(default_factory=list)
    """Rows with a bitmask processor (in ``bitmask`` row order)."""
    failed: dict[str, FinishReason] = field(default_factory=dict)
    """Sequences whose ``fill_bitmask`` raised: they end with ``error``."""
    seconds: float = 0.0
    """Time spent filling."""


def has_masks(states: list[CachedRequestState]) -> bool:
    """Whether any of these sequences has a bitmask processor (a grammar)."""
    return any(p.uses_bitmask for s in states for p in s.processors)


def fill_masks(states: list[CachedRequestState], vocab_width: int,
               ended: frozenset[str] = frozenset()) -> FilledMasks:
    """Fill the bitmask of every row of ``states`` with a bitmask processor. Touches only those
    processors (their ``fill_bitmask``), so it may run on another thread while nothing else uses
    them; never raises for a processor's failure (that row lands in ``failed``). Rows of ``ended``
    sequences (a step scheduled ahead of their end) are left alone: their tokens are dropped."""
    start = time.perf_counter()
    rows = [i for i, s in enumerate(states)
            if s.req_id not in ended and any(p.uses_bitmask for p in s.processors)]
    if not rows:
        return FilledMasks(None)
    failed: dict[str, FinishReason] = {}
    bitmask = allocate_bitmask(len(states), vocab_width)
    scratch: torch.Tensor | None = None
    for i in rows:
        masks = [p for p in states[i].processors if p.uses_bitmask]
        try:
            masks[0].fill_bitmask(bitmask, i)
            for extra in masks[1:]:  # several masks on one row: allowed = the intersection
                if scratch is None:
                    scratch = allocate_bitmask(1, vocab_width)
                extra.fill_bitmask(scratch, 0)
                bitmask[i] &= scratch[0]
        except Exception:
            logger.exception("kvloom: fill_bitmask failed for request %s", states[i].req_id)
            failed[states[i].req_id] = "error"
    return FilledMasks(bitmask, rows, failed, time.perf_counter() - start)


def apply_processors(logits: torch.Tensor, states: list[CachedRequestState],
                     masks: FilledMasks | None = None, ended: frozenset[str] = frozenset()) -> dict[str, FinishReason]:
    """Mask and edit ``logits`` ``[B, V]`` (row ``i`` belongs to ``states[i]``) in place.

    ``masks``: this batch's bitmask if it was filled ahead (``fill_masks``), else it is filled
    here. Returns the sequences whose processors failed (``"error"``): they still sample this
    step (from whatever their row holds) and then end. Rows of ``ended`` sequences are left alone.
    """
    if masks is None:
        masks = fill_masks(states, logits.shape[1], ended)
    failed = dict(masks.failed)
    if masks.bitmask is not None:
        apply_bitmask(logits, masks.bitmask.to(logits.device, non_blocking=True), masks.rows)
    for i, s in enumerate(states):
        for p in s.processors:
            if s.req_id in failed or s.req_id in ended:
                break
            try:
                p.process_logits(logits[i])
            except Exception:
                logger.exception("kvloom: process_logits failed for request %s", s.req_id)
                failed[s.req_id] = "error"
    return failed


def accept_tokens(
    states: list[CachedRequestState], token_ids: list[int], reasons: dict[str, FinishReason],
    ended: frozenset[str] = frozenset(),
) -> dict[str, FinishReason]:
    """Feed each row's sampled token to its processors; add ``stop``/``error`` ends to ``reasons``.
    Rows of ``ended`` sequences are skipped."""
    for s, token in zip(states, token_ids, strict=True):
        if not s.processors or s.req_id in reasons or s.req_id in ended:
            continue
        try:
            accepted = all([p.accept_token(token) for p in s.processors])  # every processor sees it
            if not accepted:
                logger.error("kvloom: a logits processor rejected token %d of request %s", token, s.req_id)
                reasons[s.req_id] = "error"
            elif any(p.is_terminated() for p in s.processors):
                reasons[s.req_id] = "stop"
        except Exception:
            logger.exception("kvloom: accept_token failed for request %s", s.req_id)
            reasons[s.req_id] = "error"
    return reasons

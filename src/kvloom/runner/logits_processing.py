"""Drive the sequences' logits processors around the sampler (engine thread).

Before sampling, one ``int32`` bitmask ``[B, ceil(V / 32)]`` for the whole batch is filled by
the bitmask processors (grammars) of the rows that have one and applied to those rows only,
in one call; then each processor's ``process_logits`` edits its row. After sampling, every
processor accepts its row's token. Rows without processors cost nothing, and a step with
no processors at all never allocates the bitmask.

A processor that raises, or rejects the sampled token, ends only its own sequence (finish
reason ``error``; the exception is logged); a processor that reports ``is_terminated`` ends
its sequence with ``stop``.
"""

from __future__ import annotations

import logging

import torch

from kvloom.outputs import FinishReason
from kvloom.runner.state import CachedRequestState
from kvloom.structured.bitmask import allocate_bitmask, apply_bitmask

logger = logging.getLogger(__name__)


def apply_processors(logits: torch.Tensor, states: list[CachedRequestState]) -> dict[str, FinishReason]:
    """Mask and edit ``logits`` ``[B, V]`` (row ``i`` belongs to ``states[i]``) in place.

    Returns the sequences whose processors failed (``"error"``): they still sample this step
    (from whatever their row holds) and then end.
    """
    failed: dict[str, FinishReason] = {}
    rows = [i for i, s in enumerate(states) if any(p.uses_bitmask for p in s.processors)]
    if rows:
        vocab_width = logits.shape[1]
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
        apply_bitmask(logits, bitmask.to(logits.device, non_blocking=True), rows)
    for i, s in enumerate(states):
        for p in s.processors:
            if s.req_id in failed:
                break
            try:
                p.process_logits(logits[i])
            except Exception:
                logger.exception("kvloom: process_logits failed for request %s", s.req_id)
                failed[s.req_id] = "error"
    return failed


def accept_tokens(
    states: list[CachedRequestState], token_ids: list[int], reasons: dict[str, FinishReason]
) -> dict[str, FinishReason]:
    """Feed each row's sampled token to its processors; add ``stop``/``error`` ends to ``reasons``."""
    for s, token in zip(states, token_ids, strict=True):
        if not s.processors or s.req_id in reasons:
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

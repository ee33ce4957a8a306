"""The loop side of prefix handles: live handles, the pin budget, and pins in flight.

A ``cache_prefix`` call reserves its blocks against the budget (``begin``), submits a
``pin_prefix`` request, and claims the blocks the engine pinned when it finished
(``claim``). The engine reports pins as data (``StepOutput.pinned``), so a pin may arrive
after its caller is gone (cancelled, timed out): ``on_pinned`` then gives it straight back
through the ``unpin`` callback. Invariant: every block the engine pinned is either held by a
live handle or handed to ``unpin`` exactly once; the reserved count is the sum of live
handles' blocks and of the calls in flight.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

from kvloom.engine.prefix import PrefixHandle
from kvloom.errors import PrefixBudgetError


class PrefixRegistry:
    """Event-loop only. ``unpin(block_ids)`` queues an unpin for the engine thread."""

    def __init__(self, budget_blocks: int, pin_fraction: float, num_blocks: int,
                 unpin: Callable[[list[int]], None]) -> None:
        self.budget_blocks = budget_blocks
        self._describe_budget = f"prefix_pin_fraction {pin_fraction} x {num_blocks} blocks"
        self._unpin = unpin
        self._handles: dict[str, PrefixHandle] = {}
        self._in_flight: dict[str, int] = {}
        """cache_prefix request id -> blocks reserved for it."""
        self._arrived: dict[str, list[int]] = {}
        """Pins the engine reported for calls still in flight, not yet claimed."""
        self.num_reserved = 0

    # ---- a cache_prefix call -------------------------------------------------------------
    def begin(self, request_id: str, num_blocks: int) -> None:
        """Reserve ``num_blocks`` for a call about to submit ``request_id``; raises
        ``PrefixBudgetError`` past the budget (nothing reserved then)."""
        if self.num_reserved + num_blocks > self.budget_blocks:
            raise PrefixBudgetError(
                f"pinning {num_blocks} more blocks would exceed the pin budget ({self.num_reserved} pinned of "
                f"{self.budget_blocks} = {self._describe_budget})")
        self.num_reserved += num_blocks
        self._in_flight[request_id] = num_blocks

    def on_pinned(self, request_id: str, block_ids: list[int]) -> None:
        """The engine pinned ``block_ids`` for ``request_id``: keep them for the caller, or
        give them back at once if the caller is gone."""
        if request_id in self._in_flight:
            self._arrived[request_id] = block_ids
        else:
            self._unpin(block_ids)

    def claim(self, request_id: str) -> list[int]:
        """The call's request finished: its pinned blocks (the reservation becomes their count)."""
        reserved = self._in_flight.pop(request_id)
        block_ids = self._arrived.pop(request_id, [])
        self.num_reserved += len(block_ids) - reserved
        return block_ids

    def abandon(self, request_id: str) -> None:
        """The call failed or was cancelled: drop its reservation and unpin whatever arrived
        (a pin arriving later is unpinned by ``on_pinned``). Idempotent."""
        reserved = self._in_flight.pop(request_id, None)
        if reserved is None:
            return
        self.num_reserved -= reserved
        block_ids = self._arrived.pop(request_id, None)
        if block_ids:
            self._unpin(block_ids)

    # ---- live handles --------------------------------------------------------------------
    def add(
        self, handle_id: str, token_ids: Sequence[int], block_ids: list[int], block_size: int,
        cache_salt: str | None, messages: Sequence[dict[str, Any]] | None, adapter: str | None,
        adapter_hash: str | None,
    ) -> PrefixHandle:
        handle = PrefixHandle(
            handle_id, tuple(token_ids), block_ids, block_size, cache_salt,
            tuple(messages) if messages is not None else None, adapter=adapter, adapter_hash=adapter_hash,
            _release=weakref.WeakMethod(self.release),
        )
        self._handles[handle_id] = handle
        return handle

    def is_live(self, handle: PrefixHandle) -> bool:
        return self._handles.get(handle.handle_id) is handle

    def release(self, handle: PrefixHandle) -> None:
        """Unpin a live handle's blocks (called by ``PrefixHandle.release``)."""
        if self._handles.pop(handle.handle_id, None) is None:
            return
        self.num_reserved -= handle.num_blocks
        if handle.block_ids:
            self._unpin(list(handle.block_ids))

    def handles(self) -> list[PrefixHandle]:
        return list(self._handles.values())

    def count_message_hits(self, messages: Sequence[dict[str, Any]], cache_salt: str | None) -> None:
        """A chat request without ``prefix=``: count it on every live handle it starts with."""
        for handle in self._handles.values():
            if handle.matches_messages(messages) and handle.cache_salt == cache_salt:
                handle.hits += 1

    def close(self) -> None:
        """The engine is gone (its pins with it): every handle becomes released."""
        for handle in self._handles.values():
            handle.released = True
        self._handles.clear()
        self._in_flight.clear()
        self._arrived.clear()
        self.num_reserved = 0

"""Per-request block tables over a ``BlockPool``.

A request's table covers its computed tokens plus the tokens scheduled this step; slots are
allocated on demand, one block at a time, so the only waste is the unused tail of each
request's last block.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvloom.kv_cache.block_pool import BlockId, BlockPool


@dataclass(slots=True, frozen=True)
class KVCacheStats:
    """A snapshot of the pool. ``waste`` = allocated slots / tokens held (1.0 is no waste)."""

    num_blocks: int
    block_size: int
    used_blocks: int
    tokens_held: int
    peak_used_blocks: int
    tokens_held_at_peak: int

    @property
    def peak_waste(self) -> float:
        return self.peak_used_blocks * self.block_size / max(1, self.tokens_held_at_peak)


class KVCacheManager:
    """Owns the block tables of all requests with KV in the cache. Engine-thread only."""

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.watermark_blocks = int(watermark * num_blocks)
        self.req_to_blocks: dict[str, list[BlockId]] = {}
        self.req_to_num_tokens: dict[str, int] = {}
        self._tokens_held = 0
        self._peak_used = 0
        self._tokens_at_peak = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_fit_alone(self, num_tokens: int) -> bool:
        """Whether a request of ``num_tokens`` total tokens fits in an empty pool."""
        return self.blocks_needed(num_tokens) <= self.pool.num_blocks

    def allocate_slots(self, request_id: str, num_tokens: int, *, new_request: bool = False) -> list[BlockId] | None:
        """Grow ``request_id``'s table to hold ``num_tokens`` tokens in all.

        Returns the newly allocated block ids (possibly empty), or None when the pool cannot
        supply them (nothing is allocated then). A new request must also leave the watermark
        free, so that running requests can keep decoding without immediate preemption.
        """
        blocks = self.req_to_blocks.get(request_id, [])
        num_new = self.blocks_needed(num_tokens) - len(blocks)
        reserve = self.watermark_blocks if new_request else 0
        if num_new > self.pool.num_free_blocks - reserve:
            return None
        new_ids = self.pool.allocate(num_new) if num_new > 0 else []
        self.req_to_blocks[request_id] = blocks + new_ids
        held = self.req_to_num_tokens.get(request_id, 0)
        if num_tokens > held:
            self._tokens_held += num_tokens - held
            self.req_to_num_tokens[request_id] = num_tokens
        self._record_peak()
        return new_ids

    def get_block_ids(self, request_id: str) -> list[BlockId]:
        return self.req_to_blocks.get(request_id, [])

    def free(self, request_id: str) -> None:
        """Release all of a request's blocks (finished, aborted or preempted)."""
        blocks = self.req_to_blocks.pop(request_id, [])
        self._tokens_held -= self.req_to_num_tokens.pop(request_id, 0)
        self.pool.free(list(reversed(blocks)))

    def _record_peak(self) -> None:
        used = self.pool.num_blocks - self.pool.num_free_blocks
        if used > self._peak_used:
            self._peak_used = used
            self._tokens_at_peak = self._tokens_held

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            num_blocks=self.pool.num_blocks,
            block_size=self.block_size,
            used_blocks=self.pool.num_blocks - self.pool.num_free_blocks,
            tokens_held=self._tokens_held,
            peak_used_blocks=self._peak_used,
            tokens_held_at_peak=self._tokens_at_peak,
        )

    def check_all_free(self) -> None:
        """Invariant after every engine run: no request holds blocks and every block is free."""
        self.pool.check_invariants()
        assert not self.req_to_blocks, f"requests still hold blocks: {sorted(self.req_to_blocks)}"
        assert self.pool.num_free_blocks == self.pool.num_blocks

"""Per-request block tables over a ``BlockPool``, and prefix-cache lookups.

A request's table covers its computed tokens plus the tokens scheduled this step; slots are
allocated on demand, one block at a time, so the only waste is the unused tail of each
request's last block. With prefix caching on, every block that fills up is registered under
its chain hash, and a new request starts from the longest cached prefix of its tokens (never
the whole prompt: its last token is always computed, to produce logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvloom.kv_cache.block_pool import BlockId, BlockPool
from kvloom.kv_cache.hashing import BlockHash, hash_full_blocks


@dataclass(slots=True, frozen=True)
class KVCacheStats:
    """A snapshot of the pool. ``waste`` = allocated slots / tokens held (1.0 is no waste)."""

    num_blocks: int
    block_size: int
    used_blocks: int
    tokens_held: int
    peak_used_blocks: int
    tokens_held_at_peak: int
    cached_blocks: int = 0
    """Blocks findable in the prefix cache (held or evictable)."""
    queried_tokens: int = 0
    """Prompt tokens looked up in the prefix cache."""
    hit_tokens: int = 0
    """Of those, tokens whose KV was reused."""
    evictions: int = 0
    pinned_blocks: int = 0
    """Blocks pinned by prefix handles (never evicted while pinned)."""

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    @property
    def peak_waste(self) -> float:
        return self.peak_used_blocks * self.block_size / max(1, self.tokens_held_at_peak)


class KVCacheManager:
    """Owns the block tables of all requests with KV in the cache. Engine-thread only."""

    def __init__(
        self, num_blocks: int, block_size: int, watermark: float = 0.01, enable_caching: bool = True
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.req_to_hashes: dict[str, list[BlockHash]] = {}
        self.req_to_num_cached: dict[str, int] = {}
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.num_pinned = 0
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

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, request_id: str, token_ids: Sequence[int], extra_keys: tuple[object, ...]) -> list[BlockHash]:
        """The request's full-block hashes, extended to cover ``token_ids``."""
        hashes = self.req_to_hashes.setdefault(request_id, [])
        if len(hashes) < len(token_ids) // self.block_size:
            parent = hashes[-1] if hashes else None
            hashes.extend(hash_full_blocks(token_ids, self.block_size, len(hashes), parent, extra_keys))
        return hashes

    def find_cached_prefix(
        self, request_id: str, token_ids: Sequence[int], extra_keys: tuple[object, ...] = ()
    ) -> list[BlockId]:
        """The cached blocks holding the longest prefix of ``token_ids`` (whole blocks, and
        never the last token). Nothing is reserved: pass them to ``allocate_slots``."""
        if not self.enable_caching:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        hashes = self._hashes(request_id, token_ids[: max_blocks * self.block_size], extra_keys)
        hits: list[BlockId] = []
        for i in range(max_blocks):
            bid = self.pool.lookup(hashes[i], token_ids[i * self.block_size : (i + 1) * self.block_size])
            if bid is None:
                break
            hits.append(bid)
        return hits

    def pin(self, token_ids: Sequence[int], extra_keys: tuple[object, ...] = ()) -> list[BlockId]:
        """Hold the cached whole blocks of ``token_ids`` (all of them, last one included) so
        eviction cannot touch them; returns them (a run stops at the first block not cached)."""
        bs = self.block_size
        hashes = hash_full_blocks(token_ids, bs, extra_keys=extra_keys)
        held: list[BlockId] = []
        for i, block_hash in enumerate(hashes):
            bid = self.pool.lookup(block_hash, token_ids[i * bs : (i + 1) * bs])
            if bid is None:
                break
            held.append(bid)
        self.pool.incref(held)
        self.num_pinned += len(held)
        return held

    def unpin(self, block_ids: Sequence[BlockId]) -> None:
        """Release a pin: the blocks become ordinary (evictable) cached blocks again."""
        self.pool.free(list(reversed(block_ids)))
        self.num_pinned -= len(block_ids)

    def record_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        """Count a request's first lookup (retries and recomputes are not counted)."""
        self.queried_tokens += num_queried_tokens
        self.hit_tokens += num_hit_tokens

    def allocate_slots(
        self, request_id: str, num_tokens: int, *, new_request: bool = False, cached: Sequence[BlockId] = ()
    ) -> list[BlockId] | None:
        """Grow ``request_id``'s table to hold ``num_tokens`` tokens in all.

        ``cached`` (a request without blocks yet) are prefix-cache hits that start its table.
        Returns the newly allocated block ids (possibly empty), or None when the pool cannot
        supply them (nothing is allocated then). A new request must also leave the watermark
        free, so that running requests can keep decoding without immediate preemption.
        """
        blocks = self.req_to_blocks.get(request_id, [])
        assert not (blocks and cached), "cached prefix blocks only start a table"
        num_new = self.blocks_needed(num_tokens) - len(blocks) - len(cached)
        # Hits that nobody holds sit in the free queue: taking them uses up free blocks too.
        num_free_hits = sum(1 for b in cached if self.pool.blocks[b].ref_cnt == 0)
        reserve = self.watermark_blocks if new_request else 0
        if num_new + num_free_hits > self.pool.num_free_blocks - reserve:
            return None
        if cached:
            self.pool.incref(list(cached))
            blocks = list(cached)
            self.req_to_num_cached[request_id] = len(cached)
        new_ids = self.pool.allocate(num_new) if num_new > 0 else []
        self.req_to_blocks[request_id] = blocks + new_ids
        held = self.req_to_num_tokens.get(request_id, 0)
        if num_tokens > held:
            self._tokens_held += num_tokens - held
            self.req_to_num_tokens[request_id] = num_tokens
        self._record_peak()
        return new_ids

    def cache_computed_blocks(
        self, request_id: str, token_ids: Sequence[int], num_computed: int, extra_keys: tuple[object, ...] = ()
    ) -> None:
        """Register the request's blocks that are now full and computed in the prefix cache."""
        if not self.enable_caching:
            return
        blocks = self.req_to_blocks.get(request_id, [])
        done = self.req_to_num_cached.get(request_id, 0)
        num_full = min(num_computed // self.block_size, len(blocks))
        if num_full <= done:
            return
        hashes = self._hashes(request_id, token_ids[: num_full * self.block_size], extra_keys)
        bs = self.block_size
        for i in range(done, num_full):
            self.pool.cache(blocks[i], hashes[i], token_ids[i * bs : (i + 1) * bs])
        self.req_to_num_cached[request_id] = num_full

    def fork(self, src_id: str, dst_id: str, num_tokens: int) -> list[tuple[BlockId, BlockId]] | None:
        """Give ``dst_id`` the KV of ``src_id``'s first ``num_tokens - 1`` tokens: the whole blocks
        before the one holding token ``num_tokens - 1`` are shared (refcount), that block is
        copied into a fresh one (``dst`` will write its own last token and outputs there).
        Returns the (src, dst) block copies to apply before the next forward, or None when no
        block is free."""
        src = self.req_to_blocks[src_id]
        last = (num_tokens - 1) // self.block_size
        if self.pool.num_free_blocks < 1 or last >= len(src):
            return None
        shared = src[:last]
        self.pool.incref(shared)
        [copy] = self.pool.allocate(1)
        self.req_to_blocks[dst_id] = [*shared, copy]
        self.req_to_num_cached[dst_id] = min(self.req_to_num_cached.get(src_id, 0), len(shared))  # already cached
        self.req_to_num_tokens[dst_id] = num_tokens
        self._tokens_held += num_tokens
        self._record_peak()
        return [(src[last], copy)]

    def reset_prefix_cache(self) -> int:
        """Forget the cached prefixes no request or handle holds (``BlockPool.forget_unused``)."""
        return self.pool.forget_unused()

    def get_block_ids(self, request_id: str) -> list[BlockId]:
        return self.req_to_blocks.get(request_id, [])

    def free(self, request_id: str) -> None:
        """Release all of a request's blocks (finished, aborted or preempted); cached ones stay
        findable until they are handed out again."""
        self.req_to_hashes.pop(request_id, None)
        self.req_to_num_cached.pop(request_id, None)
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
            cached_blocks=self.pool.num_cached_blocks,
            queried_tokens=self.queried_tokens,
            hit_tokens=self.hit_tokens,
            evictions=self.pool.num_evictions,
            pinned_blocks=self.num_pinned,
        )

    def check_all_free(self) -> None:
        """Invariant after every engine run (and every handle released): no request holds
        blocks, nothing is pinned, every block is free with a zero refcount."""
        self.pool.check_invariants()
        assert not self.req_to_blocks, f"requests still hold blocks: {sorted(self.req_to_blocks)}"
        assert self.num_pinned == 0, f"{self.num_pinned} blocks are still pinned"
        assert self.pool.num_free_blocks == self.pool.num_blocks
        assert all(b.ref_cnt == 0 for b in self.pool.blocks)

"""Physical KV blocks: a free list with O(1) removal, reference counts and the prefix cache.

The pool knows blocks, never requests (``manager.py`` knows requests). A block is either
free (in the free queue, ``ref_cnt == 0``) or held by one or more owners (``ref_cnt > 0``).
A full block may also be *cached*: its chain hash maps to it, so a later request with the
same prefix can reuse its KV. A cached block that nobody holds stays in the free queue and
keeps its KV until it is handed out again: the free queue is the LRU of cached blocks (new
blocks come from its head, freed ones go to its tail, a cache hit takes a block out of the
middle in O(1), which is why it is a doubly linked list).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

from kvloom.kv_cache.hashing import BlockHash

BlockId = NewType("BlockId", int)


@dataclass(slots=True, eq=False)
class Block:
    """One physical block's bookkeeping."""

    block_id: BlockId
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    """Set while the block is in the prefix cache."""
    token_ids: tuple[int, ...] = ()
    """The block's tokens while cached: a hit compares them, so a hash collision never reuses KV."""
    prev_free: Block | None = None
    next_free: Block | None = None


class FreeBlockQueue:
    """Doubly linked list of free blocks with sentinels: append, popleft and remove are O(1)."""

    def __init__(self, blocks: list[Block]) -> None:
        self._head = Block(BlockId(-1))
        self._tail = Block(BlockId(-2))
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def append(self, block: Block) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def popleft(self) -> Block:
        first = self._head.next_free
        if first is None or first is self._tail:
            raise IndexError("no free block")
        self.remove(first)
        return first

    def remove(self, block: Block) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1


class BlockPool:
    """``num_blocks`` physical blocks, ids ``0 .. num_blocks - 1``."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [Block(BlockId(i)) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.hash_to_block: dict[BlockHash, Block] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    def allocate(self, num_blocks: int) -> list[BlockId]:
        """Take ``num_blocks`` free blocks (ref_cnt becomes 1). Raises if too few are free."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        out: list[BlockId] = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block.block_id)
        return out

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            if self.hash_to_block.get(block.block_hash) is block:
                del self.hash_to_block[block.block_hash]
            block.block_hash = None
            block.token_ids = ()
            self.num_evictions += 1

    def lookup(self, block_hash: BlockHash, token_ids: Sequence[int]) -> BlockId | None:
        """The cached block holding exactly these tokens under this prefix hash, if any."""
        block = self.hash_to_block.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block.block_id

    def cache(self, block_id: BlockId, block_hash: BlockHash, token_ids: Sequence[int]) -> None:
        """Make a full, computed block findable. A prefix already cached elsewhere keeps its block."""
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self.hash_to_block:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self.hash_to_block[block_hash] = block

    def forget_unused(self) -> int:
        """Drop the prefix-cache entries of every free block; returns how many were dropped.

        Blocks someone holds (running requests, pinned prefix handles) stay cached: forgetting
        them would not free memory and would only cost their owners future hits.
        """
        unused = [b for b in self.hash_to_block.values() if b.ref_cnt == 0]
        for block in unused:
            self._evict(block)
        return len(unused)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    def incref(self, block_ids: list[BlockId]) -> None:
        """Add an owner to each block (sharing); a free block leaves the free queue."""
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free(self, block_ids: list[BlockId]) -> None:
        """Drop one owner of each block; blocks nobody holds go to the free queue's tail.

        Callers free a request's blocks in reverse order so that its tail blocks, the least
        likely to be shared later, are reused first.
        """
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_cnt <= 0:
                raise ValueError(f"block {bid} freed more often than it was allocated")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def check_invariants(self) -> None:
        """Free-queue membership matches ``ref_cnt == 0``; for tests and debugging."""
        in_queue = 0
        node = self.free_queue._head.next_free
        while node is not None and node is not self.free_queue._tail:
            assert node.ref_cnt == 0, f"block {node.block_id} is free with ref_cnt {node.ref_cnt}"
            in_queue += 1
            node = node.next_free
        assert in_queue == self.free_queue.num_free
        assert in_queue == sum(1 for b in self.blocks if b.ref_cnt == 0)
        for block_hash, block in self.hash_to_block.items():
            assert block.block_hash == block_hash, f"block {block.block_id} is mapped under another hash"

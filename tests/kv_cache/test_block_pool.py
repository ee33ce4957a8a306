"""The block pool: O(1) free list, refcounts, LRU reuse order."""

import pytest

from kvloom.kv_cache.block_pool import BlockId, BlockPool
from kvloom.kv_cache.hashing import BlockHash


def test_allocate_and_free_round_trip() -> None:
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert sorted(a + b) == list(range(8))
    assert pool.num_free_blocks == 0
    with pytest.raises(ValueError, match="asked for 1 blocks, 0 free"):
        pool.allocate(1)
    pool.free(a)
    pool.free(b)
    assert pool.num_free_blocks == 8
    pool.check_invariants()


def test_freed_blocks_are_reused_least_recently_freed_first() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    pool.free([blocks[2]])
    pool.free([blocks[0]])
    assert pool.allocate(2) == [blocks[2], blocks[0]]


def test_shared_block_returns_to_free_list_only_when_last_owner_frees() -> None:
    pool = BlockPool(4)
    [b] = pool.allocate(1)
    pool.incref([b])
    pool.free([b])
    assert pool.num_free_blocks == 3
    pool.free([b])
    assert pool.num_free_blocks == 4
    with pytest.raises(ValueError, match="freed more often"):
        pool.free([b])
    pool.check_invariants()


def test_incref_on_a_free_block_removes_it_from_the_middle_of_the_free_list() -> None:
    pool = BlockPool(5)
    pool.incref([BlockId(2)])
    assert pool.num_free_blocks == 4
    assert BlockId(2) not in pool.allocate(4)
    pool.check_invariants()


def test_forget_unused_drops_only_the_cache_entries_of_free_blocks() -> None:
    pool = BlockPool(4)
    held, released = pool.allocate(2)
    pool.cache(held, BlockHash(b"one"), [1, 2])
    pool.cache(released, BlockHash(b"two"), [3, 4])
    pool.free([released])
    assert pool.forget_unused() == 1
    assert pool.lookup(BlockHash(b"two"), [3, 4]) is None
    assert pool.lookup(BlockHash(b"one"), [1, 2]) == held, "a block someone holds (e.g. a pinned handle) stays cached"
    pool.check_invariants()

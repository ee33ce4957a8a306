"""Prefix caching at the block level: chain hashes, token-checked hits, LRU eviction."""

from __future__ import annotations

import pytest

from kvloom.kv_cache import manager as manager_module
from kvloom.kv_cache.hashing import BlockHash, hash_block, hash_full_blocks
from kvloom.kv_cache.manager import KVCacheManager


def run_request(kv: KVCacheManager, rid: str, tokens: list[int]) -> list[int]:
    """Admit like the scheduler does, 'compute' every token, return the cached block ids hit."""
    hits = kv.find_cached_prefix(rid, tokens)
    assert kv.allocate_slots(rid, len(tokens), new_request=True, cached=hits) is not None
    kv.cache_computed_blocks(rid, tokens, len(tokens))
    return [int(b) for b in hits]


def test_chain_hash_depends_on_the_whole_prefix_and_the_extra_keys() -> None:
    a = hash_full_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = hash_full_blocks([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[1] != b[1], "same second block, different first block: different hash"
    assert hash_block(None, [1, 2], ("salt-a",)) != hash_block(None, [1, 2], ("salt-b",))
    assert hash_full_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4, start=1, parent=a[0]) == a[1:]


def test_second_request_reuses_whole_blocks_but_never_its_last_token() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, watermark=0.0)
    first = list(range(1, 11))  # 10 tokens: 2 full blocks
    assert run_request(kv, "a", first) == []
    kv.free("a")
    same_prefix = [*first[:8], 99, 98, 97]
    hits = run_request(kv, "b", same_prefix)
    assert len(hits) == 2
    kv.free("b")
    exact = list(range(1, 9))  # exactly the 2 cached blocks: the last token must be computed
    assert len(run_request(kv, "c", exact)) == 1
    kv.free("c")
    stats = kv.stats()
    assert stats.cached_blocks >= 2
    kv.check_all_free()


def test_a_hash_collision_never_reuses_wrong_kv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        manager_module, "hash_full_blocks",
        lambda tokens, bs, start=0, parent=None, extra_keys=(): [BlockHash(b"same")] * (len(tokens) // bs - start),
    )
    kv = KVCacheManager(num_blocks=8, block_size=4, watermark=0.0)
    run_request(kv, "a", [1, 2, 3, 4, 5])
    kv.free("a")
    assert run_request(kv, "b", [5, 6, 7, 8, 9]) == [], "equal hashes, different tokens: no hit"


def test_unheld_cached_blocks_are_evicted_least_recently_used_first() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2, watermark=0.0)
    for rid, tokens in (("old", [1, 2, 3]), ("new", [7, 8, 9])):
        run_request(kv, rid, tokens)
        kv.free(rid)
    # 'old' freed first: its blocks leave the cache first when fresh blocks are needed.
    run_request(kv, "filler", [50, 51, 52])
    kv.free("filler")
    assert run_request(kv, "again-new", [7, 8, 9, 10]) != []
    kv.free("again-new")
    assert run_request(kv, "again-old", [1, 2, 3]) == [], "the least recently used block was evicted"
    kv.free("again-old")
    assert kv.stats().evictions >= 1
    kv.check_all_free()


def test_a_hit_on_a_block_someone_holds_shares_it() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2, watermark=0.0)
    run_request(kv, "a", [1, 2, 3, 4, 5])
    hits = run_request(kv, "b", [1, 2, 3, 4, 6])
    assert hits == [int(b) for b in kv.get_block_ids("a")[:2]]
    assert kv.pool.blocks[hits[0]].ref_cnt == 2
    kv.free("a")
    kv.free("b")
    kv.check_all_free()


def test_extra_keys_isolate_caches_such_as_adapters_and_salts() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, watermark=0.0)
    tokens = list(range(1, 14))
    sql_v1 = (("adapter", "sql", "sha256:aaaa"),)
    hits = kv.find_cached_prefix("a", tokens, sql_v1)
    assert kv.allocate_slots("a", len(tokens), new_request=True, cached=hits) is not None
    kv.cache_computed_blocks("a", tokens, len(tokens), sql_v1)
    kv.free("a")
    assert len(kv.find_cached_prefix("b", tokens, sql_v1)) == 3, "same adapter content: hit"
    kv.free("b")
    assert kv.find_cached_prefix("c", tokens, (("adapter", "sql", "sha256:bbbb"),)) == [], "reloaded weights"
    kv.free("c")
    assert kv.find_cached_prefix("d", tokens) == [], "the base model never sees adapter KV"
    kv.free("d")
    kv.check_all_free()

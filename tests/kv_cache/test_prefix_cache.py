"""Prefix caching at the block level: chain hashes, token-checked hits, LRU eviction."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvloom.kv_cache import manager as manager_module
from kvloom.kv_cache.hashing import BlockHash, extra_keys, hash_block, hash_full_blocks
from kvloom.kv_cache.manager import KVCacheManager
from kvloom.lora.adapter import LoRAAdapter
from kvloom.params import SamplingParams
from kvloom.scheduler.request import Request


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
    assert hash_block(None, [1, 2], extra_keys("salt-a")) != hash_block(None, [1, 2], extra_keys("salt-b"))
    assert hash_block(None, [1, 2], extra_keys(None, "sha-1")) != hash_block(None, [1, 2], extra_keys(None, "sha-2"))
    assert hash_block(None, [1, 2], extra_keys("s", "sha-1")) != hash_block(None, [1, 2], extra_keys(None, "sha-1"))
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


def adapter(content_hash: str, name: str = "sql") -> LoRAAdapter:
    """An adapter as the loader makes one (no weights needed: only its content hash keys the cache)."""
    return LoRAAdapter(path=Path(name), content_hash=content_hash, rank=8, weights={})


def test_extra_keys_isolate_caches_such_as_adapters_and_salts() -> None:
    """Keyed as the engine keys them: ``Request.cache_keys`` (from ``extra_keys``) is what the
    scheduler looks up, caches and pins with, so a change there that lets tenants, adapters or
    reloaded weights share KV fails here."""
    kv = KVCacheManager(num_blocks=16, block_size=4, watermark=0.0)
    tokens = list(range(1, 14))  # 3 whole blocks (and never the last token)
    ids = iter(range(1000))

    def request(salt: str | None = None, lora: LoRAAdapter | None = None) -> Request:
        return Request(f"r{next(ids)}", tokens, SamplingParams(max_tokens=1), frozenset({1}), cache_salt=salt, lora=lora)

    def run(req: Request) -> None:
        """Admit and compute it like the scheduler does, then finish it (its blocks stay cached)."""
        hits = kv.find_cached_prefix(req.request_id, req.token_ids, req.cache_keys)
        assert kv.allocate_slots(req.request_id, len(req.token_ids), new_request=True, cached=hits) is not None
        kv.cache_computed_blocks(req.request_id, req.token_ids, len(req.token_ids), req.cache_keys)
        kv.free(req.request_id)

    def hits(req: Request) -> int:
        found = kv.find_cached_prefix(req.request_id, req.token_ids, req.cache_keys)
        kv.free(req.request_id)
        return len(found)

    sql_v1 = adapter("sha256:aaaa")
    run(request(lora=sql_v1))
    assert hits(request(lora=sql_v1)) == 3, "same adapter: hit"
    assert hits(request(lora=adapter("sha256:aaaa", name="sql-copy"))) == 3, "same content under another path: hit"
    assert hits(request(lora=adapter("sha256:bbbb"))) == 0, "reloaded weights"
    assert hits(request()) == 0, "the base model never sees adapter KV"
    assert hits(request(salt="tenant-a", lora=sql_v1)) == 0, "a salt splits an adapter's cache too"

    run(request(salt="tenant-a"))
    assert hits(request(salt="tenant-a")) == 3, "same salt: hit"
    assert hits(request(salt="tenant-b")) == 0, "another tenant"
    assert hits(request()) == 0, "unsalted requests never see salted KV"
    assert hits(request(salt="tenant-a", lora=sql_v1)) == 0, "the salt's base-model KV is not the adapter's"

    # A prefix handle pins with its request's keys; the requests that use it must find those blocks.
    handle = request(salt="tenant-a", lora=sql_v1)
    run(handle)
    pinned = kv.pin(handle.prompt_token_ids, handle.cache_keys)
    assert len(pinned) == 3
    assert hits(request(salt="tenant-a", lora=sql_v1)) == 3
    assert hits(request(salt="tenant-b", lora=sql_v1)) == 0
    kv.unpin(pinned)
    kv.check_all_free()

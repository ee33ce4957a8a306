"""Per-request block tables: on-demand slots, watermark, waste accounting."""

from kvloom.kv_cache.manager import KVCacheManager


def test_slots_are_allocated_one_block_at_a_time() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, watermark=0.0)
    assert len(kv.allocate_slots("a", 3) or []) == 1
    assert kv.allocate_slots("a", 4) == []
    assert len(kv.allocate_slots("a", 5) or []) == 1
    assert len(kv.get_block_ids("a")) == 2
    stats = kv.stats()
    assert (stats.used_blocks, stats.tokens_held) == (2, 5)
    kv.free("a")
    kv.check_all_free()


def test_allocation_that_does_not_fit_allocates_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, watermark=0.0)
    assert kv.allocate_slots("a", 12) is not None
    assert kv.allocate_slots("b", 8) is None
    assert kv.get_block_ids("b") == []
    assert kv.pool.num_free_blocks == 1


def test_new_requests_leave_the_watermark_free() -> None:
    kv = KVCacheManager(num_blocks=100, block_size=1, watermark=0.05)
    assert kv.allocate_slots("a", 96, new_request=True) is None
    assert kv.allocate_slots("a", 95, new_request=True) is not None
    assert kv.allocate_slots("a", 100) is not None  # a running request may use the reserve


def test_peak_waste_is_allocated_slots_over_tokens_held() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=16, watermark=0.0)
    kv.allocate_slots("a", 17)
    kv.allocate_slots("b", 16)
    stats = kv.stats()
    assert stats.peak_used_blocks == 3
    assert stats.tokens_held_at_peak == 33
    assert abs(stats.peak_waste - 48 / 33) < 1e-9

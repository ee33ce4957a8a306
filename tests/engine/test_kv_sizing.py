"""How many KV blocks the pool gets, and the errors when a budget holds none."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvloom import LLM, ConfigError
from kvloom.config import CacheConfig
from kvloom.models.config import load_model_config
from kvloom.runner.kv_tensors import bytes_per_block, choose_num_blocks


def test_budget_in_bytes_gives_whole_blocks(llama_dir: Path) -> None:
    model = load_model_config(llama_dir)
    per_block = bytes_per_block(model, 16, torch.float32)
    # tiny llama: 2 layers * 16 tokens * 2 kv heads * 16 dims * 4 bytes * (K and V)
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4
    cache = CacheConfig(kv_cache_memory=10 * per_block + per_block // 2)
    assert choose_num_blocks(cache, model, torch.float32, torch.device("cpu"), 512, 128) == 10


def test_default_pool_is_capped_at_what_max_num_seqs_can_use(llama_dir: Path) -> None:
    model = load_model_config(llama_dir)
    blocks = choose_num_blocks(CacheConfig(), model, torch.float32, torch.device("cpu"), 512, 3)
    assert blocks == 3 * 512 // 16


def test_engine_reports_its_pool_and_a_budget_below_one_block_is_a_clear_error(llama_dir: Path) -> None:
    llm = LLM(llama_dir, kv_cache_memory=1 << 20)
    stats = llm.kv_cache_stats()
    assert stats.num_blocks == (1 << 20) // (2 * 2 * 16 * 2 * 16 * 4)
    assert stats.block_size == 16
    with pytest.raises(ConfigError, match="kv_cache_memory"):
        LLM(llama_dir, kv_cache_memory=100)

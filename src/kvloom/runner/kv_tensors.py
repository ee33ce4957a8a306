"""Allocating the paged KV tensors and choosing how many blocks they hold."""

from __future__ import annotations

import math

import torch

from kvloom.config import DEFAULT_CPU_KV_BYTES, CacheConfig
from kvloom.errors import ConfigError
from kvloom.models.config import ModelConfig

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer for one block of ``block_size`` tokens."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * elem


def choose_num_blocks(
    cache: CacheConfig,
    model: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    max_num_seqs: int,
    available_bytes: int | None = None,
) -> int:
    """Blocks in the pool: ``num_kv_blocks`` if set, else budget // block bytes.

    The budget is ``kv_cache_memory`` if set, else ``available_bytes`` (GPU: what profiling
    left free under ``gpu_memory_utilization``), else ``DEFAULT_CPU_KV_BYTES``. A budget-derived
    pool is capped at what ``max_num_seqs`` full-length sequences could ever use.
    """
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    per_block = bytes_per_block(model, cache.block_size, dtype)
    if cache.kv_cache_memory is not None:
        budget = cache.kv_cache_memory
    elif available_bytes is not None:
        budget = available_bytes
    else:
        budget = DEFAULT_CPU_KV_BYTES
    num_blocks = budget // per_block
    if num_blocks < 1:
        field = "kv_cache_memory" if cache.kv_cache_memory is not None else "gpu_memory_utilization"
        raise ConfigError(
            f"{field}: the KV budget ({budget} bytes) holds no block of {per_block} bytes "
            f"(block_size={cache.block_size}) on {device}"
        )
    cap = max_num_seqs * math.ceil(max_model_len / cache.block_size)
    return int(min(num_blocks, cap))


def allocate_kv_caches(
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> KVCaches:
    """Per layer ``(k_cache, v_cache)``, each ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    Zero-filled: attention masks unused slots, and masked garbage could still be NaN/Inf,
    which poisons a masked matmul (0 * NaN = NaN).
    """
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(model.num_layers)
    ]

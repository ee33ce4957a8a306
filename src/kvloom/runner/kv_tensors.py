"""Allocating the paged KV tensors and choosing how many blocks they hold."""

from __future__ import annotations

import math

import torch

from kvloom.config import DEFAULT_CPU_KV_BYTES, CacheConfig
from kvloom.errors import ConfigError
from kvloom.models.config import ModelConfig

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def choose_kv_dtype(requested: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV tensors' dtype for ``kv_cache_dtype=requested``: the model's for ``auto``, int8 on CPU; a
    ``ConfigError`` naming the field where the choice cannot run."""
    if requested == "auto":
        return model_dtype
    if requested == "int8":
        if device.type != "cpu":
            raise ConfigError(f"kv_cache_dtype='int8' runs on CPU (the C and torch attention paths); on {device.type} "
                              "use 'auto' (the Triton kernels read int8 caches but have not been measured on a GPU)")
        return torch.int8
    if requested == "fp8_e4m3":
        raise ConfigError(f"kv_cache_dtype='fp8_e4m3' needs a GPU with FP8 attention kernels, which kvloom does not "
                          f"have yet; on {device.type} use 'auto'" + (" or 'int8'" if device.type == "cpu" else ""))
    raise ConfigError(f"kv_cache_dtype must be 'auto', 'int8' or 'fp8_e4m3'; got {requested!r}")


def row_width(model: ModelConfig, dtype: torch.dtype) -> int:
    """The last dimension of a KV tensor: ``head_dim``, or ``head_dim + 4`` for an int8 cache (each row's
    float32 scale follows its values: ``kernels.kv_int8``)."""
    from kvloom.kernels import kv_int8

    return kv_int8.row_width(model.head_dim) if dtype == torch.int8 else model.head_dim


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer for one block of ``block_size`` tokens."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * row_width(model, dtype) * elem


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
    """Per layer ``(k_cache, v_cache)``, each ``[num_blocks, block_size, num_kv_heads, head_dim]`` (an int8
    ``dtype``: ``head_dim + 4``, see ``row_width``).

    Zero-filled: attention masks unused slots, and masked garbage could still be NaN/Inf,
    which poisons a masked matmul (0 * NaN = NaN).
    """
    shape = (num_blocks, block_size, model.num_kv_heads, row_width(model, dtype))
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(model.num_layers)
    ]

"""The int8 KV cache layout (``kv_cache_dtype="int8"``): each token's row of each kv head holds its ``D``
values quantized to int8 and, right after them, their float32 scale (4 bytes, the float's bit pattern).

A cache is ``[num_blocks, block_size, Hkv, D + 4]`` int8: the same two tensors per layer as a float
cache, so block tables, copies of blocks (forks), prefix caching and preemption move quantized rows
and their scales together without knowing about either. Symmetric, per token and kv head:
``scale = max|x| / 127`` (1 for an all-zero row), ``q = round(x / scale)``, each value off by at most
``scale / 2``. A token's scale is fixed when it is written, so appending a token never rewrites
another's (a scale per block would have to grow as the block fills).

The row of 68 bytes (``D = 64``) replaces 256 in float32 and 128 in bf16: a pool of the same bytes
holds 3.8x / 1.9x the tokens.
"""

from __future__ import annotations

from typing import Any

import torch

SCALE_BYTES = 4
"""Bytes after each row's ``D`` int8 values: its float32 scale."""


def is_int8(cache: torch.Tensor) -> bool:
    """Whether ``cache`` is an int8 KV cache (``[..., D + 4]`` int8 rows)."""
    return cache.dtype == torch.int8


def head_dim(cache: torch.Tensor) -> int:
    """``D`` of a KV cache ``[num_blocks, block_size, Hkv, D]`` (float) or ``[..., D + 4]`` (int8)."""
    return int(cache.shape[-1]) - (SCALE_BYTES if is_int8(cache) else 0)


def row_width(head_dim: int) -> int:
    """The last dimension of an int8 cache for heads of ``head_dim``."""
    return head_dim + SCALE_BYTES


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` (any float dtype) -> ``[..., D + 4]`` int8 rows: ``D`` values, then the float32 scale's bytes."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x32 / scale).clamp_(-127, 127).to(torch.int8)
    return torch.cat([q, scale.contiguous().view(torch.int8)], dim=-1)


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``rows [..., D + 4]`` int8 -> ``[..., D]`` in ``dtype``: each value times its row's scale (in float32)."""
    d = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., d:].contiguous().view(torch.float32)
    return (rows[..., :d].float() * scale).to(dtype)


def triton_scale_args(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[Any, ...]:
    """The Triton attention kernels' scale arguments: for int8 caches, the caches seen as float32 (a row's
    scale is float ``D / 4`` of its row there: ``D + 4`` bytes are ``D / 4 + 1`` floats, ``D`` a multiple of
    4), their first three strides and that column; for float caches, unused stand-ins."""
    if not is_int8(k_cache):
        return k_cache, v_cache, 0, 0, 0, 0
    k32, v32 = k_cache.view(torch.float32), v_cache.view(torch.float32)
    return k32, v32, k32.stride(0), k32.stride(1), k32.stride(2), head_dim(k_cache) // 4

"""Random paged K/V for kernel tests: per-sequence keys and values scattered into shuffled blocks.

No side effects on import (the CUDA tests in tests/gpu use it with the compiled kernels).
"""

from dataclasses import dataclass

import torch


@dataclass
class PagedKV:
    """Random per-sequence K/V scattered into shuffled cache blocks.

    ``keys[b]``/``values[b]``: ``[L_b, Hkv, D]`` dense truth. Cache slots no sequence owns hold NaN,
    so a kernel that reads past a sequence's length (or a stale block) fails loudly. Each row of
    ``block_tables`` past its sequence's blocks (every row has at least one such entry) holds
    ``pad_block``, a block no sequence owns: all NaN, so reading a table entry past the sequence
    poisons the result too (block 0, the engine's padding, may be another sequence's real block).
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    pad_block: int


def make_paged_kv(seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype = torch.float32, seed: int = 0) -> PagedKV:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay NaN
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    physical = torch.randperm(num_blocks, generator=gen).tolist()  # non-contiguous, shuffled
    pad_block = physical.pop(0)  # a spare: never handed to a sequence, so all NaN
    block_tables = torch.full((len(seq_lens), max(blocks_per_seq) + 1), pad_block, dtype=torch.int32)
    keys, values = [], []
    for b, seq_len in enumerate(seq_lens):
        ids = [physical.pop() for _ in range(blocks_per_seq[b])]
        block_tables[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        key = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        value = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        for pos in range(seq_len):
            k_cache[ids[pos // block_size], pos % block_size] = key[pos]
            v_cache[ids[pos // block_size], pos % block_size] = value[pos]
        keys.append(key)
        values.append(value)
    return PagedKV(k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32), keys, values,
                   pad_block)

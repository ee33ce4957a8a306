"""Shared fixtures for the kernel tests: Triton's CPU interpreter and paged-cache builders.

How triton reads ``TRITON_INTERPRET`` (triton 3.x): ``triton.jit`` consults
``triton.knobs.runtime.interpret`` (a live ``getenv``) when it *decorates* a function and returns an
interpreted function if set; importing triton does not freeze it. kvloom's kernels are decorated
lazily on first launch and cached per value of the variable, so setting it for the session before
any test launches a kernel is enough. It is restored when the session ends, so GPU tests elsewhere
in the same run still get compiled kernels.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch


@pytest.fixture(scope="session")
def triton_interpret() -> Iterator[None]:
    """Run Triton kernels on CPU through the interpreter; a visible skip when triton is missing."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels are not tested")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield


@dataclass
class PagedKV:
    """Random per-sequence K/V scattered into shuffled cache blocks.

    ``keys[b]``/``values[b]``: ``[L_b, Hkv, D]`` dense truth. Cache slots no sequence owns hold NaN,
    so a kernel that reads past a sequence's length (or a stale block) fails loudly.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def _make_paged_kv(seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype = torch.float32, seed: int = 0) -> PagedKV:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay NaN
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    physical = torch.randperm(num_blocks, generator=gen).tolist()  # non-contiguous, shuffled
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
    return PagedKV(k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32), keys, values)


@pytest.fixture
def make_paged_kv() -> Callable[..., PagedKV]:
    """Factory: ``make_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype=..., seed=...)``."""
    return _make_paged_kv


def _dense_causal_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 oracle: ``q`` ``[q_len, Hq, D]`` are the last ``q_len`` positions of ``key``/``value``
    ``[L, Hkv, D]``; returns ``[q_len, Hq, D]`` float64."""
    q_len, num_q_heads, _ = q.shape
    seq_len, num_kv_heads, _ = key.shape
    group = num_q_heads // num_kv_heads
    k = key.double().repeat_interleave(group, dim=1)
    v = value.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    query_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    scores = scores.masked_fill(torch.arange(seq_len)[None, :] > query_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.fixture
def dense_causal_attention() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """The float64 dense oracle (see ``_dense_causal_attention``)."""
    return _dense_causal_attention

"""store_kv: new tokens land in their slots, padding (-1) and every other slot stay untouched."""

from collections.abc import Callable

import pytest
import torch

from kvloom.kernels.store_kv import store_kv, store_kv_ref

StoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _run_store(store: StoreFn, block_size: int, dtype: torch.dtype, strided_input: bool = False,
               strided_cache: bool = False) -> None:
    num_kv_heads, head_dim, num_tokens = 2, 24, 11
    num_blocks = 32 // block_size + 4
    gen = torch.Generator().manual_seed(block_size)
    if strided_input:  # K and V as slices of one fused [T, 2 * Hkv + 1, D] projection output
        fused = torch.randn(num_tokens, 2 * num_kv_heads + 1, head_dim, generator=gen).to(dtype)
        key, value = fused[:, :num_kv_heads], fused[:, num_kv_heads: 2 * num_kv_heads]
    else:
        key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
        value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[0, 4, num_tokens - 1]] = -1  # padding tokens, including the first and the last
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if strided_cache:  # every other kv head of a wider buffer: not viewable as [num_slots, H, D]
        k_cache = torch.full((*shape[:2], 2 * num_kv_heads, head_dim), float("nan"), dtype=dtype)[:, :, ::2]
        v_cache = torch.full((*shape[:2], 2 * num_kv_heads, head_dim), float("nan"), dtype=dtype)[:, :, ::2]
    else:
        k_cache = torch.full(shape, float("nan"), dtype=dtype)
        v_cache = torch.full(shape, float("nan"), dtype=dtype)

    store(key, value, k_cache, v_cache, slots)

    valid = slots >= 0
    flat_k = k_cache.reshape(-1, num_kv_heads, head_dim)
    flat_v = v_cache.reshape(-1, num_kv_heads, head_dim)
    assert torch.equal(flat_k[slots[valid]], key[valid])
    assert torch.equal(flat_v[slots[valid]], value[valid])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots[valid]] = False
    assert flat_k[untouched].isnan().all() and flat_v[untouched].isnan().all()


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_store_kv_ref(block_size: int, dtype: torch.dtype) -> None:
    _run_store(store_kv_ref, block_size, dtype)


def test_store_kv_ref_strided_cache() -> None:
    _run_store(store_kv_ref, 16, torch.float32, strided_input=True, strided_cache=True)


def test_store_kv_ref_all_padding_is_a_no_op() -> None:
    k_cache = torch.full((2, 4, 1, 8), float("nan"))
    v_cache = k_cache.clone()
    store_kv_ref(torch.ones(3, 1, 8), torch.ones(3, 1, 8), k_cache, v_cache, torch.full((3,), -1))
    assert k_cache.isnan().all() and v_cache.isnan().all()


@pytest.mark.usefixtures("triton_interpret")
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_store_kv_triton(block_size: int, dtype: torch.dtype) -> None:
    _run_store(store_kv, block_size, dtype, strided_input=block_size == 16)


@pytest.mark.usefixtures("triton_interpret")
def test_store_kv_triton_strided_cache() -> None:
    _run_store(store_kv, 16, torch.float16, strided_input=True, strided_cache=True)

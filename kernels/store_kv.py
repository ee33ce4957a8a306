"""Write new tokens' K/V into the paged KV cache.

Layout (per layer): ``k_cache``, ``v_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
Token ``t`` goes to flat slot ``slot_mapping[t] = block_id * block_size + offset``; a slot of -1
(padding) is skipped and leaves the cache untouched.

Triton is imported only when the kernel is first launched, so importing this module (and the
pure-torch reference the CPU path runs) never imports triton.
"""

import functools
import os
from typing import Any

import torch

from kvloom.kernels import kv_int8


def _check(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, f"value {tuple(value.shape)} != key {tuple(key.shape)}"
    assert k_cache.shape == v_cache.shape, "k_cache and v_cache must have the same shape"
    width = kv_int8.row_width(head_dim) if kv_int8.is_int8(k_cache) else head_dim
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_kv_heads, width), (
        f"cache {tuple(k_cache.shape)} does not match [*, *, {num_kv_heads}, {width}]")
    assert slot_mapping.shape == (num_tokens,), f"slot_mapping {tuple(slot_mapping.shape)} != [{num_tokens}]"


def store_kv_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, *, has_padding: bool | None = None) -> None:
    """Pure-torch ``store_kv``; what the CPU path runs and what the kernel is tested against.

    Args:
        key, value: ``[T, num_kv_heads, head_dim]``, any float dtype (cast to the cache's).
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, written in place; or int8
            caches ``[..., head_dim + 4]`` (``kv_int8``), which get each row quantized with its scale.
        slot_mapping: ``[T]`` int64 flat slots; -1 skips the token. Valid slots are distinct.
        has_padding: whether any slot is -1, when the caller knows (the CPU backend checks once
            per step, not once per layer); ``None`` checks here.
    """
    _check(key, value, k_cache, v_cache, slot_mapping)
    slots = slot_mapping.long()
    # Padding is rare: test for it once instead of always paying for a boolean-mask gather.
    if has_padding is None:
        has_padding = bool((slots < 0).any())
    if has_padding:
        valid = slots >= 0
        slots, key, value = slots[valid], key[valid], value[valid]
    block_size = k_cache.shape[1]
    if kv_int8.is_int8(k_cache):
        key, value = kv_int8.quantize_rows(key), kv_int8.quantize_rows(value)
    if k_cache.is_contiguous() and v_cache.is_contiguous():
        # index_copy_ on the [num_slots, H, D] view is the fastest in-place scatter on CPU.
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))
    else:
        block_ids, offsets = slots // block_size, slots % block_size
        k_cache[block_ids, offsets] = key.to(k_cache.dtype)
        v_cache[block_ids, offsets] = value.to(v_cache.dtype)


@functools.cache
def _build_kernel(interpret_env: str) -> Any:
    """Define the kernel on first use. ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates,
    so the kernel is cached per value of that variable (``interpret_env``)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _store_kv_kernel(
        key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
        stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
        stride_cb, stride_co, stride_ch, stride_cd,
        block_size, num_kv_heads, head_dim,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program per token: copies its [num_kv_heads, head_dim] K and V rows.
        token = tl.program_id(0)
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot < 0:
            return
        heads = tl.arange(0, BLOCK_H)[:, None]
        dims = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < num_kv_heads) & (dims < head_dim)
        dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_co
        dst += heads * stride_ch + dims * stride_cd
        k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims * stride_kd, mask=mask)
        v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims * stride_vd, mask=mask)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)

    return _store_kv_kernel


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Triton ``store_kv``: scatter ``key``/``value`` rows into the caches at ``slot_mapping``.

    Same contract as :func:`store_kv_ref` (int8 caches included: the rows are quantized by
    ``kv_int8.quantize_rows`` first). ``key``/``value`` may be strided views (e.g. slices of
    a fused QKV output); ``slot_mapping`` must be on the caches' device.
    """
    _check(key, value, k_cache, v_cache, slot_mapping)
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must share strides"
    if kv_int8.is_int8(k_cache):  # quantize here; the kernel then copies rows of D + 4 int8
        key, value = kv_int8.quantize_rows(key), kv_int8.quantize_rows(value)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    import triton

    kernel = _build_kernel(os.environ.get("TRITON_INTERPRET", ""))
    kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        *key.stride(), *value.stride(), *k_cache.stride(),
        k_cache.shape[1], num_kv_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )

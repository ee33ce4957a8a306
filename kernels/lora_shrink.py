"""LoRA shrink: each adapter token's input times its slot's A, for every slice of a fused projection.

Shapes: ``x``: ``[T, in]``; ``a``: ``[S, n_slices, R, in]`` (slot-stacked A; ranks below ``R``
are zero rows); ``y``: ``[num_lora_tokens, n_slices, R]`` float32, in *grouped* row order.
Tokens are grouped by slot into segments (see ``kvloom.lora.mapping``): segment ``g`` is
grouped rows ``seg_starts[g] .. seg_starts[g] + seg_lens[g] - 1``, its tokens are
``token_ids`` at those rows and use slot ``seg_slots[g]``. For each grouped row ``j`` of
segment ``g`` and slice ``i``: ``y[j, i] = a[seg_slots[g], i] @ x[token_ids[j]]``.
Tokens without an adapter are in no segment: they are never read and own no row of ``y``.

Triton is imported only when the kernel is first launched.
"""

import functools
import os
from typing import Any

import torch


def _check(x: torch.Tensor, a: torch.Tensor, token_ids: torch.Tensor, seg_starts: torch.Tensor,
           seg_lens: torch.Tensor, seg_slots: torch.Tensor, out: torch.Tensor | None) -> None:
    assert x.dim() == 2 and a.dim() == 4, "x: [T, in], a: [S, n_slices, R, in]"
    assert a.shape[3] == x.shape[1], f"a's in_features {a.shape[3]} != x's {x.shape[1]}"
    assert seg_starts.shape == seg_lens.shape == seg_slots.shape, "segment tensors must have one shape"
    if out is not None:
        assert out.shape == (token_ids.shape[0], a.shape[1], a.shape[2]), (
            f"out {tuple(out.shape)} != [{token_ids.shape[0]}, {a.shape[1]}, {a.shape[2]}]")
        assert out.dtype == torch.float32, "out must be float32"


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, token_ids: torch.Tensor, seg_starts: torch.Tensor,
                    seg_lens: torch.Tensor, seg_slots: torch.Tensor, max_seg_len: int, *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch shrink (the CPU path): one GEMM per segment, over all slices at once.

    ``a[slot]`` viewed as ``[n_slices * R, in]`` turns a segment's shrink into one
    ``[len, in] @ [in, n_slices * R]`` product written straight into its contiguous rows of
    ``out``. Segment tensors are read on the host (free on CPU). ``max_seg_len`` is accepted
    for interface parity with the kernel. Returns ``out`` ``[num_lora_tokens, n_slices, R]`` float32.
    """
    _check(x, a, token_ids, seg_starts, seg_lens, seg_slots, out)
    num_slots, n_slices, rank, in_features = a.shape
    out = torch.empty(token_ids.shape[0], n_slices, rank, dtype=torch.float32, device=x.device) if out is None else out
    flat_out = out.view(-1, n_slices * rank)
    flat_a = a.view(num_slots, n_slices * rank, in_features)
    for start, length, slot in zip(seg_starts.tolist(), seg_lens.tolist(), seg_slots.tolist(), strict=True):
        xs = x.index_select(0, token_ids[start:start + length])
        if x.dtype == torch.float32 and a.dtype == torch.float32:
            torch.mm(xs, flat_a[slot].t(), out=flat_out[start:start + length])
        else:
            flat_out[start:start + length] = (xs @ flat_a[slot].t().to(xs.dtype)).float()
    return out


@functools.cache
def _build_kernel(interpret_env: str) -> Any:
    """Define the kernel on first use, once per value of ``TRITON_INTERPRET`` (read by ``triton.jit``)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _lora_shrink_kernel(
        x_ptr, a_ptr, y_ptr, token_ids_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr,
        in_features, rank, num_n_tiles,
        stride_xt, stride_xk, stride_as, stride_ai, stride_ar, stride_ak, stride_yt, stride_yi, stride_yr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        # Program (m tile, segment, slice * num_n_tiles + n tile): a [BLOCK_M, BLOCK_N] tile of y.
        # Segments shorter than this m tile exit at once (the grid is sized for the longest one).
        pid_m = tl.program_id(0)
        seg = tl.program_id(1)
        pid_sn = tl.program_id(2)
        seg_len = tl.load(seg_lens_ptr + seg)
        if pid_m * BLOCK_M >= seg_len:
            return
        slice_id = pid_sn // num_n_tiles
        n_tile = pid_sn % num_n_tiles
        slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m < seg_len
        rows = tl.load(seg_starts_ptr + seg).to(tl.int64) + m
        tokens = tl.load(token_ids_ptr + rows, mask=m_mask, other=0).to(tl.int64)
        n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < rank
        a_base = a_ptr + slot * stride_as + slice_id * stride_ai
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < in_features
            x = tl.load(x_ptr + tokens[:, None] * stride_xt + k[None, :] * stride_xk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            a = tl.load(a_base + n[None, :] * stride_ar + k[:, None] * stride_ak,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_FP32:
                x = x.to(tl.float32)
                a = a.to(tl.float32)
            else:
                x = x.to(a.dtype)
            acc += tl.dot(x, a, input_precision=PRECISION)
        tl.store(y_ptr + rows[:, None] * stride_yt + slice_id * stride_yi + n[None, :] * stride_yr, acc,
                 mask=m_mask[:, None] & n_mask[None, :])

    return _lora_shrink_kernel


def lora_shrink(x: torch.Tensor, a: torch.Tensor, token_ids: torch.Tensor, seg_starts: torch.Tensor,
                seg_lens: torch.Tensor, seg_slots: torch.Tensor, max_seg_len: int, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton shrink; same contract as :func:`lora_shrink_ref`.

    ``max_seg_len`` (a host int ``>= max(seg_lens)``) sizes the grid, so the launch never reads
    the device. fp32 runs in IEEE precision; 16-bit inputs use 16-bit dots with fp32 accumulation.
    """
    _check(x, a, token_ids, seg_starts, seg_lens, seg_slots, out)
    import triton

    _, n_slices, rank, in_features = a.shape
    out = torch.empty(token_ids.shape[0], n_slices, rank, dtype=torch.float32, device=x.device) if out is None else out
    num_segments = seg_slots.shape[0]
    if num_segments == 0 or max_seg_len == 0:
        return out
    interpret_env = os.environ.get("TRITON_INTERPRET", "")
    # Triton's interpreter multiplies 16-bit dot operands wrongly; there, and only there, dots run in fp32.
    dot_fp32 = a.dtype == torch.float32 or interpret_env.lower() in ("1", "true", "on", "yes")
    block_m = 16 if max_seg_len <= 16 else (32 if max_seg_len <= 32 else 64)
    block_n = min(max(16, triton.next_power_of_2(rank)), 64)
    num_n_tiles = triton.cdiv(rank, block_n)
    grid = (triton.cdiv(max_seg_len, block_m), num_segments, n_slices * num_n_tiles)
    _build_kernel(interpret_env)[grid](
        x, a, out, token_ids, seg_starts, seg_lens, seg_slots,
        in_features, rank, num_n_tiles,
        *x.stride(), *a.stride(), *out.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32 if a.element_size() > 2 else 64,
        PRECISION="ieee" if dot_fp32 else "tf32", DOT_FP32=dot_fp32,
    )
    return out

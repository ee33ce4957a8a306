"""LoRA expand: add each adapter token's shrunk activations times its slot's B into the output, in place.

Shapes: ``y``: ``[num_lora_tokens, n_slices, R]`` float32 in grouped row order (what
``lora_shrink`` writes); ``b``: ``[S, sum(output_sizes), R]`` (slot-stacked B, slices stacked
along the output dim as in the fused base weight; ranks below ``R`` are zero columns);
``out``: ``[T, sum(output_sizes)]``. Slice ``i`` owns output columns
``[off_i, off_i + output_sizes[i])`` with ``off_i = sum(output_sizes[:i])``. For each grouped
row ``j`` of segment ``g`` (see ``lora_shrink``) and slice ``i``:
``out[token_ids[j], off_i:off_i + n_i] += y[j, i] @ b[seg_slots[g], off_i:off_i + n_i].T``.
Rows of tokens without an adapter are neither read nor written.

Triton is imported only when the kernel is first launched.
"""

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch

MAX_SLICES = 4
"""Most slices a fused projection may have (q/k/v is 3)."""


def _check(y: torch.Tensor, b: torch.Tensor, out: torch.Tensor, token_ids: torch.Tensor,
           output_sizes: Sequence[int]) -> None:
    assert y.dim() == 3 and b.dim() == 3 and out.dim() == 2, "y: [N, n_slices, R], b: [S, out, R], out: [T, out]"
    assert y.shape[0] == token_ids.shape[0], f"y has {y.shape[0]} rows for {token_ids.shape[0]} tokens"
    assert y.shape[1] == len(output_sizes) <= MAX_SLICES, f"{y.shape[1]} slices for sizes {tuple(output_sizes)}"
    assert y.shape[2] == b.shape[2], f"y's rank {y.shape[2]} != b's {b.shape[2]}"
    assert b.shape[1] == out.shape[1] == sum(output_sizes), (
        f"b {tuple(b.shape)} / out {tuple(out.shape)} do not hold output sizes {tuple(output_sizes)}")


def lora_expand_ref(y: torch.Tensor, b: torch.Tensor, out: torch.Tensor, token_ids: torch.Tensor,
                    seg_starts: torch.Tensor, seg_lens: torch.Tensor, seg_slots: torch.Tensor,
                    output_sizes: Sequence[int], max_seg_len: int) -> None:
    """Pure-torch expand (the CPU path): per segment, one GEMM per slice and one ``index_add_``.

    Segment tensors are read on the host (free on CPU); ``max_seg_len`` is accepted for
    interface parity with the kernel. Computes in ``b``'s dtype (fp32 for fp32 weights).
    """
    _check(y, b, out, token_ids, output_sizes)
    n_slices = len(output_sizes)
    for start, length, slot in zip(seg_starts.tolist(), seg_lens.tolist(), seg_slots.tolist(), strict=True):
        ys = y[start:start + length].to(b.dtype)
        b_slot = b[slot]
        if n_slices == 1:
            delta = ys[:, 0] @ b_slot.t()
        else:
            delta = torch.empty(length, out.shape[1], dtype=b.dtype, device=out.device)
            col = 0
            for i, size in enumerate(output_sizes):
                torch.mm(ys[:, i], b_slot[col:col + size].t(), out=delta[:, col:col + size])
                col += size
        out.index_add_(0, token_ids[start:start + length], delta.to(out.dtype))


@functools.cache
def _build_kernel(interpret_env: str) -> Any:
    """Define the kernel on first use, once per value of ``TRITON_INTERPRET`` (read by ``triton.jit``)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _lora_expand_kernel(
        y_ptr, b_ptr, out_ptr, token_ids_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr,
        rank, num_n_tiles, bound1, bound2, bound3, bound4,
        stride_yt, stride_yi, stride_yr, stride_bs, stride_bo, stride_br, stride_ot, stride_oo,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        # Program (m tile, segment, slice * num_n_tiles + n tile) owns a [BLOCK_M, BLOCK_N] tile of
        # `out`: tokens belong to one segment and slices own disjoint columns, so every element is
        # read-modified-written by exactly one program (no atomics).
        pid_m = tl.program_id(0)
        seg = tl.program_id(1)
        pid_sn = tl.program_id(2)
        seg_len = tl.load(seg_lens_ptr + seg)
        slice_id = pid_sn // num_n_tiles
        n_tile = pid_sn % num_n_tiles
        lo = tl.where(slice_id == 0, 0, tl.where(slice_id == 1, bound1, tl.where(slice_id == 2, bound2, bound3)))
        hi = tl.where(slice_id == 0, bound1, tl.where(slice_id == 1, bound2, tl.where(slice_id == 2, bound3, bound4)))
        col0 = lo + n_tile * BLOCK_N
        # Short segments, and n tiles past a narrower slice's end (k/v next to q), have no work.
        if (pid_m * BLOCK_M >= seg_len) | (col0 >= hi):
            return
        slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m < seg_len
        rows = tl.load(seg_starts_ptr + seg).to(tl.int64) + m
        tokens = tl.load(token_ids_ptr + rows, mask=m_mask, other=0).to(tl.int64)
        cols = col0 + tl.arange(0, BLOCK_N)
        n_mask = cols < hi
        b_base = b_ptr + slot * stride_bs
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            r_mask = r < rank
            y = tl.load(y_ptr + rows[:, None] * stride_yt + slice_id * stride_yi + r[None, :] * stride_yr,
                        mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            b = tl.load(b_base + cols[None, :] * stride_bo + r[:, None] * stride_br,
                        mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_FP32:
                b = b.to(tl.float32)
            else:
                y = y.to(b.dtype)
            acc += tl.dot(y, b, input_precision=PRECISION)
        out_ptrs = out_ptr + tokens[:, None] * stride_ot + cols[None, :] * stride_oo
        mask = m_mask[:, None] & n_mask[None, :]
        base = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (base + acc).to(out_ptr.dtype.element_ty), mask=mask)

    return _lora_expand_kernel


def lora_expand(y: torch.Tensor, b: torch.Tensor, out: torch.Tensor, token_ids: torch.Tensor,
                seg_starts: torch.Tensor, seg_lens: torch.Tensor, seg_slots: torch.Tensor,
                output_sizes: Sequence[int], max_seg_len: int) -> None:
    """Triton expand; same contract as :func:`lora_expand_ref` (``out`` may be any 2-D strided view).

    ``max_seg_len`` (a host int ``>= max(seg_lens)``) sizes the grid, so the launch never reads
    the device. Accumulates in fp32 and adds to ``out`` in fp32 before rounding once.
    """
    _check(y, b, out, token_ids, output_sizes)
    import triton

    num_segments = seg_slots.shape[0]
    if num_segments == 0 or max_seg_len == 0:
        return
    rank = b.shape[2]
    bounds = [0]
    for size in output_sizes:
        bounds.append(bounds[-1] + size)
    bounds += [bounds[-1]] * (MAX_SLICES + 1 - len(bounds))
    interpret_env = os.environ.get("TRITON_INTERPRET", "")
    # Triton's interpreter multiplies 16-bit dot operands wrongly; there, and only there, dots run in fp32.
    dot_fp32 = b.dtype == torch.float32 or interpret_env.lower() in ("1", "true", "on", "yes")
    block_m = 16 if max_seg_len <= 16 else (32 if max_seg_len <= 32 else 64)
    block_n = 64
    num_n_tiles = triton.cdiv(max(output_sizes), block_n)
    grid = (triton.cdiv(max_seg_len, block_m), num_segments, len(output_sizes) * num_n_tiles)
    _build_kernel(interpret_env)[grid](
        y, b, out, token_ids, seg_starts, seg_lens, seg_slots,
        rank, num_n_tiles, *bounds[1:],
        *y.stride(), *b.stride(), *out.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=min(max(16, triton.next_power_of_2(rank)), 64),
        PRECISION="ieee" if dot_fp32 else "tf32", DOT_FP32=dot_fp32,
    )

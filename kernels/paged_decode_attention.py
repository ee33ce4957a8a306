"""Decode attention over the paged KV cache: one query token per sequence.

Shapes: ``q``: ``[B, Hq, D]``; ``k_cache``, ``v_cache``: ``[num_blocks, block_size, Hkv, D]``;
``block_tables``: ``[B, M]`` int32; ``seq_lens``: ``[B]`` int32 (``>= 1``). GQA: ``Hq = Hkv * group``
and q head ``h`` reads kv head ``h // group``. Sequence ``b``'s query attends to its keys
``0 .. seq_lens[b] - 1``, found at ``block_tables[b, pos // block_size]``, offset ``pos % block_size``.

Triton is imported only when the kernel is first launched.
"""

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kvloom.kernels import kv_int8


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor) -> None:
    num_seqs, num_q_heads, head_dim = q.shape
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4, "caches: [num_blocks, block_size, Hkv, D]"
    assert kv_int8.head_dim(k_cache) == head_dim, f"head_dim {head_dim} != cache head_dim {kv_int8.head_dim(k_cache)}"
    assert num_q_heads % k_cache.shape[2] == 0, f"Hq={num_q_heads} is not a multiple of Hkv={k_cache.shape[2]}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, "block_tables: [B, M]"
    assert seq_lens.shape == (num_seqs,), f"seq_lens {tuple(seq_lens.shape)} != [{num_seqs}]"


class GatherWorkspace:
    """Reusable scratch for the reference's padded K/V gather.

    Each decode step gathers ``2 * B * Lpad * Hkv * D`` elements (tens of MB for a 64-sequence batch);
    freshly allocated, those pages are faulted in and zeroed by the OS on every call, which doubled
    the median step time on CPU. One workspace per backend (used by one thread at a time) keeps them.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D ``[numel]`` view of the buffer, grown (with 25% headroom) when too small."""
        buffer = self._buffer
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = self._buffer = torch.empty(numel + numel // 4, dtype=dtype, device=device)
        return buffer[:numel]


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Decode rows of similar length, attended by one SDPA call over one padded K/V gather.

    Invariants: ``block_ids`` holds ``num_blocks`` table entries per row (``[len(rows) * num_blocks]``);
    ``padded_len = num_blocks * block_size >= max(seq_lens of rows)``; ``pad_rows`` lists the flat
    ``[row * padded_len + pos]`` indices with ``pos >= seq_len`` (``None``: no row is padded), and
    ``mask`` is ``True`` where a key is attended (``None`` exactly when ``pad_rows`` is).
    """

    rows: torch.Tensor | None
    """``[Bg]`` int64 rows of ``q``/``out`` in this group; ``None`` means all rows, in order."""
    num_rows: int
    num_blocks: int
    block_ids: torch.Tensor
    pad_rows: torch.Tensor | None
    mask: torch.Tensor | None
    """``[Bg, 1, 1, padded_len]`` bool."""


def plan_decode(block_tables: torch.Tensor, seq_lens_cpu: list[int], block_size: int,
                max_groups: int = 4, min_group_rows: int = 16) -> list[DecodeGroup]:
    """Split a decode batch into at most ``max_groups`` groups of similar length; what every layer
    of a step shares, so masks, padding indices and gather indices are built once per step.

    Rows are sorted by length and cut into equal parts (at least ``min_group_rows`` each): with
    lengths spread over [L, 2L], one padded gather would copy and attend ~25-35% padding; four
    groups cut that to a few percent, for three more (cheap) SDPA calls per layer.
    """
    num_seqs = len(seq_lens_cpu)
    device = block_tables.device
    num_groups = max(1, min(max_groups, num_seqs // min_group_rows))
    order = sorted(range(num_seqs), key=seq_lens_cpu.__getitem__) if num_groups > 1 else list(range(num_seqs))
    groups: list[DecodeGroup] = []
    for g in range(num_groups):
        members = order[g * num_seqs // num_groups: (g + 1) * num_seqs // num_groups]
        lens = [seq_lens_cpu[i] for i in members]
        num_blocks = min(-(-max(lens) // block_size), block_tables.shape[1])
        padded_len = num_blocks * block_size
        if num_groups == 1:
            rows, table = None, block_tables[:, :num_blocks]
        else:
            rows = torch.tensor(members, dtype=torch.int64).to(device, non_blocking=True)
            table = block_tables.index_select(0, rows)[:, :num_blocks]
        pad_rows = mask = None
        if any(n < padded_len for n in lens):
            is_padding = torch.arange(padded_len)[None, :] >= torch.tensor(lens)[:, None]
            pad_rows = is_padding.flatten().nonzero().squeeze(1).to(device, non_blocking=True)
            mask = (~is_padding).view(len(members), 1, 1, padded_len).to(device, non_blocking=True)
        groups.append(DecodeGroup(rows, len(members), num_blocks, table.reshape(-1).long(), pad_rows, mask))
    return groups


def _gather_padded(cache: torch.Tensor, group: DecodeGroup, scratch: torch.Tensor | None) -> torch.Tensor:
    """``group``'s blocks of ``cache`` as ``[Bg, Hkv, Lpad, D]`` (a strided view SDPA reads as is),
    padding rows zeroed; written into ``scratch`` (1-D, exactly the gathered size) when given. An int8
    cache (``kv_int8``) is gathered, then dequantized to float32 (``scratch`` unused)."""
    _, block_size, num_kv_heads, width = cache.shape
    if kv_int8.is_int8(cache):
        blocks = kv_int8.dequantize_rows(cache.index_select(0, group.block_ids))
    elif scratch is None:
        blocks = cache.index_select(0, group.block_ids)
    else:
        blocks = scratch.view(-1, block_size, num_kv_heads, width)
        torch.index_select(cache, 0, group.block_ids, out=blocks)
    head_dim = blocks.shape[-1]
    if group.pad_rows is not None:
        blocks.view(-1, num_kv_heads, head_dim).index_fill_(0, group.pad_rows, 0)
    return blocks.view(group.num_rows, group.num_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)


def paged_decode_attention_planned(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   groups: list[DecodeGroup], scale: float, *, out: torch.Tensor,
                                   workspace: GatherWorkspace | None = None) -> torch.Tensor:
    """Decode attention over ``plan_decode``'s groups: per group, gather its rows' blocks into a
    padded ``[Bg, Lpad, Hkv, D]`` K/V (padding rows zeroed: stale slots may hold anything, and a
    masked score still multiplies its V row by 0, where 0 * NaN would poison the row), then one
    SDPA call with the ``group`` q heads of a kv head folded into SDPA's query-length axis
    (``[Bg, Hkv, group, D]``), so K/V are never expanded to ``Hq`` heads.

    ``q``/``out``: ``[B, Hq, D]``; returns ``out``.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    for group in groups:
        gathered_numel = group.block_ids.numel() * block_size * num_kv_heads * head_dim
        quantized = kv_int8.is_int8(k_cache)
        scratch = None if workspace is None or quantized else workspace.get(2 * gathered_numel, k_cache.dtype,
                                                                           k_cache.device)
        keys = _gather_padded(k_cache, group, None if scratch is None else scratch[:gathered_numel])
        values = _gather_padded(v_cache, group, None if scratch is None else scratch[gathered_numel:])
        rows_q = q if group.rows is None else q.index_select(0, group.rows)
        query = rows_q.reshape(group.num_rows, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
        attn = F.scaled_dot_product_attention(query, keys.to(q.dtype), values.to(q.dtype), attn_mask=group.mask,
                                              scale=scale)
        if group.rows is None:
            out.copy_(attn.view(num_seqs, num_q_heads, head_dim))
        else:
            out.index_copy_(0, group.rows, attn.view(group.num_rows, num_q_heads, head_dim))
    return out


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               max_seq_len: int, *, out: torch.Tensor | None = None,
                               workspace: GatherWorkspace | None = None,
                               seq_lens_cpu: list[int] | None = None) -> torch.Tensor:
    """Pure-torch decode attention, batched over sequences: ``plan_decode`` then
    ``paged_decode_attention_planned``. The CPU backend plans once per step instead (the plan is
    the same for every layer); this one-call form is what tests and one-off callers use.

    ``seq_lens_cpu`` (a host copy of ``seq_lens``) avoids reading the lengths back from the
    device. ``max_seq_len`` is accepted for interface parity with the Triton kernel.
    Returns ``[B, Hq, D]`` in ``q``'s dtype, written into ``out`` when given.
    """
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape, f"out {tuple(out.shape)} != q {tuple(q.shape)}"
    if q.shape[0] == 0:
        return out
    lens = seq_lens.tolist() if seq_lens_cpu is None else seq_lens_cpu
    groups = plan_decode(block_tables, lens, k_cache.shape[1])
    return paged_decode_attention_planned(q, k_cache, v_cache, groups, scale, out=out, workspace=workspace)


@functools.cache
def _build_kernel(interpret_env: str) -> Any:
    """Define the kernel on first use, once per value of ``TRITON_INTERPRET`` (read by ``triton.jit``)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
        stride_qb, stride_qh, stride_qd, stride_ob, stride_oh, stride_od,
        stride_cb, stride_co, stride_ch, stride_cd, stride_bt,
        k_scale_ptr, v_scale_ptr, stride_sb, stride_so, stride_sh, scale_col,
        qk_scale, block_size, head_dim, group,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, QUANT: tl.constexpr,
    ):
        # Program (seq, kv_head) computes the `group` q heads that share this kv head, so each
        # K/V row is loaded once. Keys come in tiles of BLOCK_N positions; each position finds its
        # physical block through the block table, so any block_size works.
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq_len = tl.load(seq_lens_ptr + seq)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_mask = g < group
        d_mask = d < head_dim
        heads = kv_head * group + g
        q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        # An int8 cache (kv_int8): its rows are widened to float32 with their scales, and the dots run in float32.
        q = q.to(tl.float32) if QUANT else q.to(k_cache_ptr.dtype.element_ty)
        if DOT_FP32:
            q = q.to(tl.float32)
        table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for start in range(0, seq_len, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            n_mask = pos < seq_len
            block = tl.load(table_ptr + pos // block_size, mask=n_mask, other=0).to(tl.int64)
            row = block * stride_cb + (pos % block_size) * stride_co + kv_head * stride_ch
            kv_off = row[:, None] + d[None, :] * stride_cd
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0)
            if QUANT:
                scale_row = block * stride_sb + (pos % block_size) * stride_so + kv_head * stride_sh + scale_col
                k = k.to(tl.float32) * tl.load(k_scale_ptr + scale_row, mask=n_mask, other=0.0)[:, None]
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 domain
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0)
            if QUANT:
                v_row = block * stride_sb + (pos % block_size) * stride_so + kv_head * stride_sh + scale_col
                v = v.to(tl.float32) * tl.load(v_scale_ptr + v_row, mask=n_mask, other=0.0)[:, None]
            if DOT_FP32:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        # seq_len == 0 (a padded batch slot) would divide 0 by 0: write zeros instead.
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od,
                 acc.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])

    return _paged_decode_kernel


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_seq_len: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton decode attention; same contract as :func:`paged_decode_attention_ref`.

    One program per (sequence, kv head), online softmax over key tiles with fp32 accumulation.
    Works for fp32/fp16/bf16 (fp32 dots run in IEEE precision, not TF32). ``max_seq_len`` is
    accepted for interface parity; the kernel reads lengths from ``seq_lens`` on the device.
    Returns ``[B, Hq, D]`` in ``q``'s dtype, written into ``out`` (any strides) when given.
    """
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must share strides"
    import triton

    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape, f"out {tuple(out.shape)} != q {tuple(q.shape)}"
    if num_seqs == 0:
        return out
    interpret_env = os.environ.get("TRITON_INTERPRET", "")
    kernel = _build_kernel(interpret_env)
    # Triton's interpreter multiplies bf16 dot operands as their raw uint16 storage (garbage);
    # there, and only there, bf16 dots run in fp32.
    dot_fp32 = k_cache.dtype == torch.bfloat16 and interpret_env.lower() in ("1", "true", "on", "yes")
    kernel[(num_seqs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, out,
        *q.stride(), *out.stride(), *k_cache.stride(), block_tables.stride(0), *kv_int8.triton_scale_args(k_cache, v_cache),
        scale * 1.4426950408889634, k_cache.shape[1], head_dim, group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        # fp32 tiles are twice as large: halve them to stay within shared memory on smaller GPUs.
        BLOCK_N=32 if max_seq_len <= 32 or k_cache.element_size() > 2 else 64,
        PRECISION="ieee" if k_cache.dtype in (torch.float32, torch.int8) or dot_fp32 else "tf32", DOT_FP32=dot_fp32,
        QUANT=kv_int8.is_int8(k_cache),
    )
    return out

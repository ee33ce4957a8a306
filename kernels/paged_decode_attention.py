"""Decode attention over the paged KV cache: one query token per sequence.

Shapes: ``q``: ``[B, Hq, D]``; ``k_cache``, ``v_cache``: ``[num_blocks, block_size, Hkv, D]``;
``block_tables``: ``[B, M]`` int32; ``seq_lens``: ``[B]`` int32 (``>= 1``). GQA: ``Hq = Hkv * group``
and q head ``h`` reads kv head ``h // group``. Sequence ``b``'s query attends to its keys
``0 .. seq_lens[b] - 1``, found at ``block_tables[b, pos // block_size]``, offset ``pos % block_size``.

Triton is imported only when the kernel is first launched.
"""

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor) -> None:
    num_seqs, num_q_heads, head_dim = q.shape
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4, "caches: [num_blocks, block_size, Hkv, D]"
    assert k_cache.shape[3] == head_dim, f"head_dim {head_dim} != cache head_dim {k_cache.shape[3]}"
    assert num_q_heads % k_cache.shape[2] == 0, f"Hq={num_q_heads} is not a multiple of Hkv={k_cache.shape[2]}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, "block_tables: [B, M]"
    assert seq_lens.shape == (num_seqs,), f"seq_lens {tuple(seq_lens.shape)} != [{num_seqs}]"


def _zero_padding(x: torch.Tensor, is_padding: torch.Tensor) -> None:
    """Zero the rows of ``x`` ``[B, P, Hkv, D]`` (contiguous) where ``is_padding`` ``[B, P]`` is set.

    Padding rows hold whatever the cache slots hold (stale or never-written memory, maybe NaN);
    a masked score still multiplies its V row by 0, and 0 * NaN poisons the whole output row.
    """
    if x.device.type == "cpu":
        # Few rows are padding: an index fill touches only them (nonzero is free on the host).
        x.view(-1, *x.shape[2:]).index_fill_(0, is_padding.flatten().nonzero().squeeze(1), 0)
    else:
        x.masked_fill_(is_padding[:, :, None, None], 0)  # no host sync


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


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               max_seq_len: int, *, out: torch.Tensor | None = None,
                               workspace: GatherWorkspace | None = None) -> torch.Tensor:
    """Pure-torch decode attention, batched over sequences; the CPU production path.

    Gathers every sequence's first ``ceil(max_seq_len / block_size)`` blocks into a padded
    ``[B, Lpad, Hkv, D]`` K/V (padding rows zeroed) and runs one SDPA call with a length mask. The
    ``group`` q heads of a kv head are folded into SDPA's query-length axis (``[B, Hkv, group, D]``),
    so K/V are never expanded to ``Hq`` heads (measured on CPU: as fast as ``enable_gqa``, ~10x
    faster than expanding). ``max_seq_len`` is a host int ``>= max(seq_lens)``: no device sync.

    Returns ``[B, Hq, D]`` in ``q``'s dtype, written into ``out`` when given. ``workspace`` holds
    the gathered K/V between calls (see :class:`GatherWorkspace`).
    """
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape, f"out {tuple(out.shape)} != q {tuple(q.shape)}"
    if num_seqs == 0:
        return out
    num_blocks = min(-(-max_seq_len // block_size), block_tables.shape[1])
    padded_len = num_blocks * block_size
    block_ids = block_tables[:, :num_blocks].reshape(-1).long()
    positions = torch.arange(padded_len, device=q.device)
    is_padding = positions[None, :] >= seq_lens[:, None]

    gathered_numel = block_ids.numel() * block_size * num_kv_heads * head_dim
    scratch = None if workspace is None else workspace.get(2 * gathered_numel, k_cache.dtype, k_cache.device)

    def gather(cache: torch.Tensor, index: int) -> torch.Tensor:
        # [B * nb, bs, Hkv, D] -> [B, Hkv, Lpad, D] (a strided view that SDPA reads as is).
        if scratch is None:
            blocks = cache.index_select(0, block_ids)
        else:
            blocks = scratch[index * gathered_numel: (index + 1) * gathered_numel].view(-1, *cache.shape[1:])
            torch.index_select(cache, 0, block_ids, out=blocks)
        padded = blocks.view(num_seqs, padded_len, num_kv_heads, head_dim)
        _zero_padding(padded, is_padding)
        return padded.transpose(1, 2).to(q.dtype)

    query = q.reshape(num_seqs, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    mask = ~is_padding.view(num_seqs, 1, 1, padded_len)
    attn = F.scaled_dot_product_attention(query, gather(k_cache, 0), gather(v_cache, 1), attn_mask=mask, scale=scale)
    out.copy_(attn.view(num_seqs, num_q_heads, head_dim))
    return out


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
        qk_scale, block_size, head_dim, group,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
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
        q = q.to(k_cache_ptr.dtype.element_ty)
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
            k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 domain
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
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
        *q.stride(), *out.stride(), *k_cache.stride(), block_tables.stride(0),
        scale * 1.4426950408889634, k_cache.shape[1], head_dim, group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        # fp32 tiles are twice as large: halve them to stay within shared memory on smaller GPUs.
        BLOCK_N=32 if max_seq_len <= 32 or k_cache.element_size() > 2 else 64,
        PRECISION="ieee" if k_cache.dtype == torch.float32 or dot_fp32 else "tf32", DOT_FP32=dot_fp32,
    )
    return out

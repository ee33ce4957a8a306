"""Prefill (and chunked-prefill) attention over the paged KV cache.

Shapes: ``q``: ``[T, Hq, D]`` (the sequences' query rows, concatenated); ``k_cache``, ``v_cache``:
``[num_blocks, block_size, Hkv, D]``; ``block_tables``: ``[B, M]`` int32; ``query_start_loc``:
``[B + 1]`` int32 with ``query_start_loc[B] == T``; ``seq_lens``: ``[B]`` int32.

Sequence ``b`` owns query rows ``[qsl[b], qsl[b + 1])`` (``q_b`` of them) and has ``L_b = seq_lens[b]
>= q_b`` keys, all already in the cache (the new ones included). Its row ``i`` sits at absolute
position ``L_b - q_b + i`` and attends causally to keys ``0 .. L_b - q_b + i``. This covers a fresh
prompt (``q_b == L_b``), a chunk continuing a cached prefix (``q_b < L_b``) and decode (``q_b == 1``).
GQA: q head ``h`` reads kv head ``h // (Hq // Hkv)``.

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
           query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> None:
    num_seqs = seq_lens.shape[0]
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "q: [T, Hq, D]; caches 4-D"
    assert kv_int8.head_dim(k_cache) == q.shape[2], f"head_dim {q.shape[2]} != cache head_dim {kv_int8.head_dim(k_cache)}"
    assert q.shape[1] % k_cache.shape[2] == 0, f"Hq={q.shape[1]} is not a multiple of Hkv={k_cache.shape[2]}"
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, "block_tables: [B, M]"
    assert query_start_loc.shape == (num_seqs + 1,), "query_start_loc: [B + 1]"


@dataclass(frozen=True, slots=True)
class PrefillSeq:
    """One prefill sequence of a step, as every layer attends it.

    Rows ``[start, end)`` of ``q`` are its queries, the last ``end - start`` of its ``seq_len``
    keys. ``block_ids`` are its ``ceil(seq_len / block_size)`` blocks; ``mask`` (``[q_len, seq_len]``
    bool, True = attend) is set for a chunk over a cached prefix and ``None`` for a fresh prompt,
    which is causal.
    """

    start: int
    end: int
    seq_len: int
    block_ids: torch.Tensor
    mask: torch.Tensor | None

    @property
    def is_fresh(self) -> bool:
        """The whole context is this step's tokens: its keys are exactly the step's new K/V."""
        return self.end - self.start == self.seq_len


def plan_prefill(block_tables: torch.Tensor, query_start_loc_cpu: list[int], seq_lens_cpu: list[int],
                 block_size: int) -> list[PrefillSeq]:
    """What every layer needs per prefill sequence, built once per step (block ids, chunk masks)."""
    plan: list[PrefillSeq] = []
    device = block_tables.device
    for b, seq_len in enumerate(seq_lens_cpu):
        start, end = query_start_loc_cpu[b], query_start_loc_cpu[b + 1]
        query_len = end - start
        block_ids = block_tables[b, : -(-seq_len // block_size)].long()
        mask = None
        if query_len != seq_len:
            key_pos = torch.arange(seq_len, device=device)
            query_pos = torch.arange(seq_len - query_len, seq_len, device=device)
            mask = key_pos[None, :] <= query_pos[:, None]
        plan.append(PrefillSeq(start, end, seq_len, block_ids, mask))
    return plan


def paged_prefill_attention_planned(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    plan: list[PrefillSeq], scale: float, *, out: torch.Tensor,
                                    new_k: torch.Tensor | None = None,
                                    new_v: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill attention over ``plan_prefill``'s sequences, one SDPA call each; returns ``out``.

    ``new_k``/``new_v`` (``[T, Hkv, D]``, rows aligned with ``q``, in the caches' dtype): the K/V
    this step stored. A fresh prompt's keys are exactly those rows, so it attends them in place
    instead of gathering its blocks back out of the cache. An int8 cache (``kv_int8``) is always read
    back (dequantized), so a prompt attends the values its later tokens will.
    """
    num_kv_heads, head_dim = k_cache.shape[2], kv_int8.head_dim(k_cache)
    direct = new_k is not None and new_v is not None and new_k.dtype == k_cache.dtype
    for seq in plan:
        query = q[None, seq.start:seq.end].transpose(1, 2)
        if direct and seq.is_fresh:
            assert new_k is not None and new_v is not None
            k = new_k[None, seq.start:seq.end].transpose(1, 2)
            v = new_v[None, seq.start:seq.end].transpose(1, 2)
        else:
            # [nb, bs, Hkv, D] -> [1, Hkv, L, D]: strided views of one gathered copy. SDPA needs 4-D
            # inputs for its fused CPU kernel: 3-D ones fall back to the math path (~2-5x slower, and
            # it materializes the [Hq, q_len, L] scores).
            k, v = k_cache.index_select(0, seq.block_ids), v_cache.index_select(0, seq.block_ids)
            if kv_int8.is_int8(k_cache):  # int8 rows and their scales -> float32
                k, v = kv_int8.dequantize_rows(k), kv_int8.dequantize_rows(v)
            k = k.view(-1, num_kv_heads, head_dim)[None, :seq.seq_len]
            v = v.view(-1, num_kv_heads, head_dim)[None, :seq.seq_len]
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if seq.mask is None:
            o = F.scaled_dot_product_attention(query, k.to(q.dtype), v.to(q.dtype), is_causal=True,
                                               scale=scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(query, k.to(q.dtype), v.to(q.dtype), attn_mask=seq.mask,
                                               scale=scale, enable_gqa=True)
        out[seq.start:seq.end] = o[0].transpose(0, 1)
    return out


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                                seq_lens: torch.Tensor, scale: float, max_query_len: int, max_seq_len: int,
                                query_start_loc_cpu: list[int] | None = None,
                                seq_lens_cpu: list[int] | None = None, *,
                                out: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch prefill attention, one SDPA call per sequence: ``plan_prefill`` then
    ``paged_prefill_attention_planned`` (the CPU backend plans once per step instead).

    Pass ``query_start_loc_cpu`` / ``seq_lens_cpu`` (host copies) to avoid a device sync; without
    them the lengths are read back with ``.tolist()``. A fresh prompt uses SDPA's ``is_causal``; a
    chunk over a cached prefix uses an explicit offset-causal mask. ``max_query_len`` and
    ``max_seq_len`` are accepted for interface parity. Returns ``[T, Hq, D]`` in ``q``'s dtype,
    written into ``out`` when given (rows past ``query_start_loc[B]`` are left as they are).
    """
    _check(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens)
    starts = query_start_loc.tolist() if query_start_loc_cpu is None else query_start_loc_cpu
    lens = seq_lens.tolist() if seq_lens_cpu is None else seq_lens_cpu
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape, f"out {tuple(out.shape)} != q {tuple(q.shape)}"
    plan = plan_prefill(block_tables, starts, lens, k_cache.shape[1])
    return paged_prefill_attention_planned(q, k_cache, v_cache, plan, scale, out=out)


@functools.cache
def _build_kernel(interpret_env: str) -> Any:
    """Define the kernel on first use, once per value of ``TRITON_INTERPRET`` (read by ``triton.jit``)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr,
        stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
        stride_cb, stride_co, stride_ch, stride_cd, stride_bt,
        k_scale_ptr, v_scale_ptr, stride_sb, stride_so, stride_sh, scale_col,
        qk_scale, block_size, head_dim, group, block_q,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, QUANT: tl.constexpr,
    ):
        # Program (seq, q tile, kv_head) owns `block_q` query tokens times the `group` q heads of
        # one kv head: row r is token r // group, head r % group. Folding the group into the rows
        # loads each K/V tile once per kv head.
        seq = tl.program_id(0)
        tile_start = tl.program_id(1) * block_q
        kv_head = tl.program_id(2)
        q_start = tl.load(query_start_loc_ptr + seq)
        query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        if tile_start >= query_len:
            return
        seq_len = tl.load(seq_lens_ptr + seq)
        context_len = seq_len - query_len

        r = tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        q_idx = tile_start + r // group
        heads = kv_head * group + r % group
        row_mask = (r < block_q * group) & (q_idx < query_len)
        d_mask = d < head_dim
        io_mask = row_mask[:, None] & d_mask[None, :]
        q_rows = (q_start + q_idx) * stride_qt + heads * stride_qh
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :] * stride_qd, mask=io_mask, other=0.0)
        # An int8 cache (kv_int8): its rows are widened to float32 with their scales, and the dots run in float32.
        q = q.to(tl.float32) if QUANT else q.to(k_cache_ptr.dtype.element_ty)
        if DOT_FP32:
            q = q.to(tl.float32)
        query_pos = context_len + q_idx
        table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Causality: no row of this tile sees past its last token's position.
        kv_end = tl.minimum(seq_len, context_len + tl.minimum(tile_start + block_q, query_len))
        for start in range(0, kv_end, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            n_mask = pos < kv_end
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
            visible = n_mask[None, :] & (pos[None, :] <= query_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
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
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_rows = (q_start + q_idx) * stride_ot + heads * stride_oh
        tl.store(out_ptr + out_rows[:, None] + d[None, :] * stride_od, acc.to(out_ptr.dtype.element_ty),
                 mask=io_mask)

    return _paged_prefill_kernel


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float, max_query_len: int, max_seq_len: int,
                            query_start_loc_cpu: list[int] | None = None, seq_lens_cpu: list[int] | None = None,
                            *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton flash-attention over the paged cache; same contract as :func:`paged_prefill_attention_ref`.

    Grid ``(B, ceil(max_query_len / block_q), Hkv)``; tiles past a sequence's query length exit at
    once. Online softmax with fp32 accumulation; fp32/fp16/bf16 inputs (fp32 dots in IEEE
    precision). ``max_query_len`` (host int ``>=`` every ``q_b``) sizes the grid without a sync; the
    host lists are accepted (and unused) so both implementations share one signature.
    Returns ``[T, Hq, D]`` in ``q``'s dtype, written into ``out`` (any strides) when given.
    """
    _check(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens)
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must share strides"
    import triton

    num_seqs = seq_lens.shape[0]
    _, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape, f"out {tuple(out.shape)} != q {tuple(q.shape)}"
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    block_m = max(64, triton.next_power_of_2(group))
    block_q = block_m // group
    interpret_env = os.environ.get("TRITON_INTERPRET", "")
    kernel = _build_kernel(interpret_env)
    # Triton's interpreter multiplies bf16 dot operands as their raw uint16 storage (garbage);
    # there, and only there, bf16 dots run in fp32.
    dot_fp32 = k_cache.dtype == torch.bfloat16 and interpret_env.lower() in ("1", "true", "on", "yes")
    kernel[(num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out,
        *q.stride(), *out.stride(), *k_cache.stride(), block_tables.stride(0), *kv_int8.triton_scale_args(k_cache, v_cache),
        scale * 1.4426950408889634, k_cache.shape[1], head_dim, group, block_q,
        BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=32 if k_cache.element_size() > 2 else 64,  # fp32: keep shared memory in budget
        PRECISION="ieee" if k_cache.dtype in (torch.float32, torch.int8) or dot_fp32 else "tf32", DOT_FP32=dot_fp32,
        QUANT=kv_int8.is_int8(k_cache),
    )
    return out

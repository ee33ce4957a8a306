"""Attention over the paged KV cache on the CPU, one query row at a time, in C
(``csrc/paged_decode_attention_cpu.c``).

:func:`paged_decode_attention_cpu` has the contract of
:func:`kvloom.kernels.paged_decode_attention.paged_decode_attention_ref` (shapes there). The torch
reference gathers every sequence's blocks into a padded copy and runs SDPA over it: each decode step
reads the whole KV cache, writes a copy of it and reads the copy again. This kernel reads each block
once, where it lies: per query row, the K rows in table order (each key's row of all kv heads
against every q head), an exact softmax over the whole row, then the V blocks. float32 and bfloat16
caches, float32 arithmetic, ``head_dim`` a multiple of 8, any GQA group.

:func:`paged_attention_rows_cpu` runs the same kernel over any query rows, each naming its sequence and
how many keys it attends: a prefill's row at position ``p`` attends ``p + 1`` keys, so a short prompt's
causal attention (or a chunk's over its cached prefix) is one call for all the step's rows, no gather.

The library is built on first use for this CPU (:mod:`kvloom.kernels.native`); :func:`load` builds
it eagerly, so a caller can learn at start-up whether the kernel is available here.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch

from kvloom.kernels import kv_int8, native

SOURCE = "paged_decode_attention_cpu"
DTYPES = (torch.float32, torch.bfloat16)
"""Dtypes of q and out; a float cache is in the same dtype, an int8 cache (``kv_int8``) serves either."""


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel handles caches of ``dtype`` (float32, bf16, or ``kv_int8``'s int8) with heads of
    ``head_dim``."""
    return (dtype in DTYPES or dtype == torch.int8) and head_dim % 8 == 0


def bind(lib: ctypes.CDLL) -> Any:
    """The kernel's entry point in a loaded build of ``csrc/paged_decode_attention_cpu.c``. Its last two
    arguments: 1 for bfloat16 q/out (0: float32), 1 for an int8 cache (``kv_int8``; 0: the cache in q's dtype)."""
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    fn = lib.kvloom_paged_rows
    fn.restype = ctypes.c_int
    fn.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, ptr, i64, i64, i64, ptr, ptr,
                   i32, i32, i32, i32, i32, ctypes.c_float, i32, i32, i32]
    return fn


@functools.cache
def load() -> Any:
    """The entry point of this machine's build, built and loaded once per process (raises
    ``native.NativeBuildError`` where it cannot be built)."""
    return bind(native.load_library(SOURCE))


def paged_decode_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               max_seq_len: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention for ``q``: ``[B, Hq, D]`` over the caches ``[num_blocks, block_size, Hkv, D]``.

    ``block_tables``: ``[B, M]`` int32 (rows may be strided); ``seq_lens``: ``[B]`` int32 (0 gives a
    zero row). The kernel checks every block id it will read against the caches before reading any, and
    finds the longest length itself; ``max_seq_len`` is accepted for interface parity. ``q`` and ``out`` may
    be strided views whose last dimension is contiguous. Runs on ``torch.get_num_threads()`` threads (at most one a row),
    without the GIL. Returns ``out`` (allocated like ``q`` when not given), in the cache's dtype.
    """
    return paged_attention_rows_cpu(q, k_cache, v_cache, block_tables, None, seq_lens, scale, out=out)


def paged_attention_rows_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, row_seq: torch.Tensor | None, row_lens: torch.Tensor,
                             scale: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention for each query row of ``q`` ``[R, Hq, D]`` over its sequence's first ``row_lens[r]`` keys.

    ``block_tables``: ``[S, M]`` int32, one row per sequence (rows may be strided); ``row_seq``: ``[R]``
    int32, the table row each query row reads (None: row ``r`` reads table row ``r``, as decode does);
    ``row_lens``: ``[R]`` int32 (0 gives a zero row). Every table row is checked up to the longest length
    asked of it, and every id against the caches, before any cache memory is read (a ``ValueError``
    otherwise). Otherwise as :func:`paged_decode_attention_cpu`.
    """
    num_rows, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    cache_dim = kv_int8.head_dim(k_cache)
    quantized = kv_int8.is_int8(k_cache)
    if not supports(k_cache.dtype, head_dim) or q.dtype not in DTYPES:
        raise ValueError(f"unsupported: dtype {k_cache.dtype} (q {q.dtype}), head_dim {head_dim} (need q in "
                         f"{DTYPES}, the cache in q's dtype or int8, head_dim a multiple of 8)")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for name, t in (("q", q), ("out", out), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("block_tables", block_tables), ("row_lens", row_lens), ("row_seq", row_seq)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}: this kernel runs on CPU tensors")
    if not (q.dtype == out.dtype and v_cache.dtype == k_cache.dtype and (quantized or k_cache.dtype == q.dtype)):
        raise ValueError(f"q {q.dtype}, out {out.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype} differ")
    if cache_dim != head_dim or v_cache.shape != k_cache.shape or num_q_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if q.stride(2) != 1 or out.stride(2) != 1 or out.shape != q.shape:
        raise ValueError("q and out must be [B, Hq, D] with a contiguous last dimension")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.stride(1) != 1 \
            or (row_seq is None and block_tables.shape[0] != num_rows):
        raise ValueError("block_tables must be int32 [B, M] with contiguous rows")
    for name, t in (("row_lens", row_lens), ("row_seq", row_seq)):
        if t is not None and (t.dtype != torch.int32 or t.shape != (num_rows,) or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous int32 [{num_rows}]")
    if num_rows == 0:
        return out
    status = load()(q.data_ptr(), q.stride(0), q.stride(1), out.data_ptr(), out.stride(0), out.stride(1),
                k_cache.data_ptr(), v_cache.data_ptr(), num_blocks, block_tables.data_ptr(), block_tables.stride(0),
                block_tables.shape[1], block_tables.shape[0], None if row_seq is None else row_seq.data_ptr(),
                row_lens.data_ptr(), num_rows, num_q_heads, num_kv_heads, head_dim, block_size, scale,
                native.threads_for(num_rows), int(q.dtype == torch.bfloat16), int(quantized))
    if status == -2:
        raise ValueError("a row's sequence, length or block ids point outside block_tables or the caches")
    if status != 0:
        raise MemoryError("paged_attention_rows_cpu could not allocate its scratch")
    return out

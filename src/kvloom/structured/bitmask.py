"""Packed token bitmasks: allocate one for a batch, apply it to the logits of some rows.

Layout (xgrammar's): ``int32 [B, ceil(V / 32)]``; bit ``t % 32`` of word ``t // 32`` set means
token ``t`` is allowed. Bits at or above ``V`` in the last word are ignored.

Row convention (xgrammar's ``indices``): ``bitmask[i]`` applies to ``logits[i]`` for each ``i``
in ``rows``; the mask has one row per logits row and rows not listed are left untouched.
"""

from __future__ import annotations

import torch

_CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def bitmask_width(vocab_width: int) -> int:
    """Words per row: ``ceil(vocab_width / 32)``."""
    return (vocab_width + 31) // 32


def allocate_bitmask(batch: int, vocab_width: int) -> torch.Tensor:
    """``int32 [batch, ceil(vocab_width / 32)]`` on CPU, every bit set (all tokens allowed)."""
    return torch.full((batch, bitmask_width(vocab_width)), -1, dtype=torch.int32)


def token_bit(token_id: int) -> int:
    """The int32 word value with only ``token_id``'s bit set (bit 31 is the sign bit)."""
    value = 1 << (token_id % 32)
    return value - (1 << 32) if value >= 1 << 31 else value


def fill_row_from_token_ids(row: torch.Tensor, token_ids: list[int]) -> None:
    """Overwrite ``row`` (``int32 [W]``) with a mask allowing exactly ``token_ids`` (all ``< 32 * W``)."""
    words = torch.zeros(row.shape[0], dtype=torch.int64)
    if token_ids:
        ids = torch.tensor(sorted(set(token_ids)), dtype=torch.int64)
        # Distinct ids in one word have distinct bits, so their sum is their bitwise OR.
        words.index_add_(0, ids // 32, torch.ones_like(ids) << (ids % 32))
    row.copy_(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))


def _check(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    if logits.dim() != 2 or bitmask.dim() != 2:
        raise ValueError(f"logits and bitmask must be 2-D, got {tuple(logits.shape)} and {tuple(bitmask.shape)}")
    if bitmask.dtype != torch.int32:
        raise ValueError(f"bitmask must be int32, got {bitmask.dtype}")
    if bitmask.shape[1] != bitmask_width(logits.shape[1]):
        raise ValueError(
            f"bitmask rows hold {bitmask.shape[1]} words; logits of width {logits.shape[1]} need "
            f"{bitmask_width(logits.shape[1])}"
        )
    if rows and (min(rows) < 0 or max(rows) >= min(logits.shape[0], bitmask.shape[0])):
        raise ValueError(f"rows {rows} out of range for {logits.shape[0]} logits and {bitmask.shape[0]} mask rows")
    if len(set(rows)) != len(rows):
        raise ValueError(f"rows must be unique, got {rows}")


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the disallowed tokens of ``logits[rows]`` to ``-inf`` in place.

    ``logits``: ``[B, V]`` float, last dimension contiguous (float32, bfloat16 or float16 take
    the xgrammar kernels). ``bitmask``: ``int32 [N, ceil(V / 32)]`` with ``N > max(rows)``, copied
    to ``logits.device`` if elsewhere. ``rows``: unique row indices. Uses xgrammar's kernels on CPU and CUDA (Triton),
    :func:`apply_bitmask_ref` elsewhere. May set the bits at or above ``V`` of ``bitmask``'s last
    word (they carry no meaning).
    """
    _check(logits, bitmask, rows)
    if not rows:
        return
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    device = logits.device.type
    if device == "cuda" or (device == "cpu" and logits.dtype in _CPU_KERNEL_DTYPES):
        import xgrammar

        if device == "cpu" and logits.shape[1] % 32:
            # xgrammar's CPU kernel (<= 0.2.8) walks the zero bits of the whole last word and
            # writes -inf past the row (into the next row, or out of the buffer) for every zero
            # bit at or above V: set those meaningless bits.
            bitmask[:, -1] |= -(1 << (logits.shape[1] % 32))  # int32 with bits V % 32 .. 31 set

        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)
    else:
        apply_bitmask_ref(logits, bitmask, rows)


def unpack_bitmask(bitmask: torch.Tensor, vocab_width: int) -> torch.Tensor:
    """``int32 [N, ceil(V / 32)]`` -> ``bool [N, V]`` (True = allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # arithmetic shift: the sign bit is masked off
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_width].bool()


def apply_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Pure-torch reference of :func:`apply_bitmask` (same arguments and effect, any device)."""
    _check(logits, bitmask, rows)
    if not rows:
        return
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    allowed = unpack_bitmask(bitmask.to(logits.device)[index], logits.shape[1])
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))

"""The batch bitmask: xgrammar's kernel against the pure-torch reference, odd widths, row subsets.
(On CUDA: tests/gpu/test_bitmask_cuda.py, run by ``nox -s gpu``.)"""

from __future__ import annotations

import pytest
import torch

from kvloom.structured.bitmask import (
    allocate_bitmask,
    apply_bitmask,
    apply_bitmask_ref,
    fill_row_from_token_ids,
    token_bit,
    unpack_bitmask,
)

WIDTHS = [1, 31, 32, 33, 100, 800, 1000, 32064]


def _random_mask(batch: int, vocab_width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**31), 2**31, (batch, (vocab_width + 31) // 32), generator=gen, dtype=torch.int64)
    return words.to(torch.int32)


def _expected(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Element by element from the bit definition (bit t % 32 of word t // 32)."""
    out = logits.clone()
    for r in rows:
        for t in range(logits.shape[1]):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


def test_allocate_is_all_allowed() -> None:
    mask = allocate_bitmask(3, 33)
    assert mask.shape == (3, 2) and mask.dtype == torch.int32 and mask.device.type == "cpu"
    assert unpack_bitmask(mask, 33).all()


@pytest.mark.parametrize("vocab_width", [1, 33, 100])
def test_reference_matches_the_bit_definition(vocab_width: int) -> None:
    logits = torch.randn(4, vocab_width)
    mask = _random_mask(4, vocab_width, seed=vocab_width)
    rows = [0, 2, 3]
    expected = _expected(logits, mask, rows)
    apply_bitmask_ref(logits, mask, rows)
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("vocab_width", WIDTHS)
@pytest.mark.parametrize("rows", [[0], [1, 3], [0, 1, 2, 3, 4], [4, 0, 2], []])
def test_xgrammar_kernel_matches_the_reference(vocab_width: int, rows: list[int]) -> None:
    mask = _random_mask(5, vocab_width, seed=vocab_width + len(rows))
    logits = torch.randn(5, vocab_width, generator=torch.Generator().manual_seed(1))
    ref = logits.clone()
    apply_bitmask(logits, mask, rows)
    apply_bitmask_ref(ref, mask, rows)
    assert torch.equal(logits, ref)
    untouched = [r for r in range(5) if r not in rows]
    assert torch.isfinite(logits[untouched]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_match_the_reference(dtype: torch.dtype) -> None:
    mask = _random_mask(3, 100, seed=7)
    logits = torch.randn(3, 100).to(dtype)
    ref = logits.clone()
    apply_bitmask(logits, mask, [0, 2])
    apply_bitmask_ref(ref, mask, [0, 2])
    assert torch.equal(logits, ref)


def test_bad_arguments_are_refused() -> None:
    logits = torch.zeros(2, 64)
    with pytest.raises(ValueError, match="words"):
        apply_bitmask(logits, allocate_bitmask(2, 96), [0])
    with pytest.raises(ValueError, match="out of range"):
        apply_bitmask(logits, allocate_bitmask(2, 64), [2])
    with pytest.raises(ValueError, match="unique"):
        apply_bitmask(logits, allocate_bitmask(2, 64), [1, 1])
    with pytest.raises(ValueError, match="int32"):
        apply_bitmask(logits, allocate_bitmask(2, 64).long(), [0])


@pytest.mark.parametrize("token_ids", [[], [0], [31], [0, 31, 32, 63, 64, 99], list(range(0, 100, 3))])
def test_fill_row_from_token_ids(token_ids: list[int]) -> None:
    mask = allocate_bitmask(2, 100)
    fill_row_from_token_ids(mask[1], token_ids)
    assert unpack_bitmask(mask, 100)[1].nonzero().flatten().tolist() == token_ids
    assert unpack_bitmask(mask, 100)[0].all()  # other rows untouched
    for t in token_ids:
        assert int(mask[1, t // 32]) & token_bit(t)


@pytest.mark.parametrize("vocab_width", [1, 17, 33, 717])
def test_zero_bits_past_the_vocab_never_write_past_the_row(vocab_width: int) -> None:
    # Processors fill the bits at or above V with 0; xgrammar's CPU kernel used to write -inf
    # for them, past the end of the row (into the next row, or out of the buffer).
    buffer = torch.randn(4 * vocab_width + 64)
    logits = buffer[: 4 * vocab_width].view(4, vocab_width)
    guard = buffer[4 * vocab_width :].clone()
    mask = torch.zeros(4, (vocab_width + 31) // 32, dtype=torch.int32)
    fill_row_from_token_ids(mask[0], [0])
    ref = logits.clone()
    apply_bitmask(logits, mask, [0, 3])
    apply_bitmask_ref(ref, mask, [0, 3])
    assert torch.equal(logits, ref)
    assert torch.isfinite(logits[1:3]).all() and torch.isfinite(logits[0, 0])
    assert torch.equal(buffer[4 * vocab_width :], guard)

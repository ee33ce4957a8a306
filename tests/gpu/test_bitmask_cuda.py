"""The grammar bitmask on a CUDA device: xgrammar's compiled Triton kernel against the pure-torch
reference computed on the CPU (itself checked against the bit definition in
tests/structured/test_bitmask.py), for odd vocabulary widths, row subsets in any order, the mask on
the host or the device, and the dtypes a model's logits come in. Skipped (visibly) without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from kvloom.structured.bitmask import apply_bitmask, apply_bitmask_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the GPU path")

CUDA = torch.device("cuda")


def _random_mask(batch: int, vocab_width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**31), 2**31, (batch, (vocab_width + 31) // 32), generator=gen, dtype=torch.int64)
    return words.to(torch.int32)


@pytest.mark.parametrize("vocab_width", [1, 31, 33, 1000, 32064])
@pytest.mark.parametrize("rows", [[5, 1, 2], [0], [0, 1, 2, 3, 4, 5], []], ids=str)
@pytest.mark.parametrize("mask_on", ["cpu", "cuda"])
def test_cuda_kernel_matches_the_cpu_reference(vocab_width: int, rows: list[int], mask_on: str) -> None:
    mask = _random_mask(6, vocab_width, seed=vocab_width + len(rows))
    logits = torch.randn(6, vocab_width, generator=torch.Generator().manual_seed(3))
    want = logits.clone()
    apply_bitmask_ref(want, mask, rows)
    got = logits.to(CUDA)
    apply_bitmask(got, mask.to(mask_on), rows)  # a host mask is copied to the logits' device
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), want)
    untouched = [r for r in range(6) if r not in rows]
    assert torch.equal(got[untouched].cpu(), logits[untouched])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_in_half_precision_matches_the_cpu_reference(dtype: torch.dtype) -> None:
    mask = _random_mask(3, 32064, seed=7)
    logits = torch.randn(3, 32064, generator=torch.Generator().manual_seed(4)).to(dtype)
    want = logits.clone()
    apply_bitmask_ref(want, mask, [0, 2])
    got = logits.to(CUDA)
    apply_bitmask(got, mask, [0, 2])
    assert torch.equal(got.cpu(), want)

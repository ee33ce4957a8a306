"""paged_prefill_attention: fresh prompts, chunks continuing a cached prefix and single-token
queries. The Triton kernel (interpreted) equals the torch reference, which equals dense float64
causal attention."""

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvloom.kernels.paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _cases(block_size: int) -> list[tuple[int, int]]:
    """(query_len, seq_len) per sequence: fresh prompts of boundary lengths, chunks over a cached
    prefix (one ending mid-block, one spanning several query tiles), and a decode-like row."""
    return [
        (1, 1),
        (block_size, block_size),
        (block_size + 1, block_size + 1),
        (5, 3 * block_size + 3),
        (1, block_size + 1),
        (block_size + 2, 2 * block_size + 7),
        (65, 75),  # one row past a 64-row query tile
    ]


def _queries(cases: list[tuple[int, int]], num_q_heads: int, head_dim: int,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``q`` ``[T, Hq, D]`` as a strided slice of a wider buffer, plus query_start_loc (tensor, list)."""
    starts = [0]
    for query_len, _ in cases:
        starts.append(starts[-1] + query_len)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(starts[-1], num_q_heads + 2, head_dim, generator=gen).to(dtype)[:, 1: num_q_heads + 1]
    return q, torch.tensor(starts, dtype=torch.int32), starts


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_ref_matches_dense(make_paged_kv: Callable[..., Any], dense_causal_attention: Callable[..., torch.Tensor],
                           block_size: int, group: int) -> None:
    cases = _cases(block_size)
    lens = [seq_len for _, seq_len in cases]
    kv = make_paged_kv(lens, block_size, 2, 32)
    q, query_start_loc, starts = _queries(cases, 2 * group, 32, torch.float32)
    out = torch.full_like(q, float("nan"))
    max_query_len = max(query_len for query_len, _ in cases)
    paged_prefill_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, kv.seq_lens, 32**-0.5,
                                max_query_len, max(lens), starts, lens, out=out)
    for b in range(len(cases)):
        rows = slice(starts[b], starts[b + 1])
        expected = dense_causal_attention(q[rows], kv.keys[b], kv.values[b], 32**-0.5)
        torch.testing.assert_close(out[rows].double(), expected, atol=1e-5, rtol=1e-5)


def test_ref_without_host_lists_reads_them_from_the_tensors(make_paged_kv: Callable[..., Any]) -> None:
    cases = _cases(16)
    lens = [seq_len for _, seq_len in cases]
    kv = make_paged_kv(lens, 16, 1, 16)
    q, query_start_loc, starts = _queries(cases, 2, 16, torch.float32)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, kv.seq_lens, 0.25, 65, max(lens))
    torch.testing.assert_close(paged_prefill_attention_ref(*args),
                               paged_prefill_attention_ref(*args, starts, lens), rtol=0, atol=0)


@pytest.mark.usefixtures("triton_interpret")
@pytest.mark.parametrize(
    ("block_size", "group", "num_kv_heads", "head_dim", "dtype"),
    [
        (1, 1, 2, 32, torch.float32),
        (1, 4, 1, 16, torch.float32),
        (16, 1, 2, 32, torch.float32),
        (16, 2, 2, 64, torch.float32),
        (16, 4, 2, 24, torch.float32),  # head_dim not a power of two: masked lanes
        (32, 2, 1, 32, torch.float32),
        (32, 4, 2, 32, torch.float32),
        (16, 3, 1, 32, torch.float32),  # group not a power of two (Hq=3, Hkv=1)
        (16, 2, 2, 32, torch.float16),
        (16, 4, 2, 32, torch.bfloat16),
    ],
    ids=str,
)
def test_triton_matches_ref(make_paged_kv: Callable[..., Any], block_size: int, group: int, num_kv_heads: int,
                            head_dim: int, dtype: torch.dtype) -> None:
    cases = _cases(block_size)
    lens = [seq_len for _, seq_len in cases]
    kv = make_paged_kv(lens, block_size, num_kv_heads, head_dim, dtype=dtype)
    q, query_start_loc, starts = _queries(cases, num_kv_heads * group, head_dim, dtype)
    scale = head_dim**-0.5
    max_query_len = max(query_len for query_len, _ in cases)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, kv.seq_lens, scale, max_query_len, max(lens))
    out = torch.full_like(q, float("nan"))  # poisoned: a row the kernel skips stays NaN
    result = paged_prefill_attention(*args, out=out)
    expected = paged_prefill_attention_ref(*args, starts, lens)
    assert result is out and not out.isnan().any()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("kernel", ["ref", "triton"])
def test_a_kernel_reading_past_its_sequence_gets_nan(make_paged_kv: Callable[..., Any], kernel: str,
                                                     request: pytest.FixtureRequest) -> None:
    """What the NaN checks above rely on: a sequence of one full block whose two query rows are told
    17 keys reads the next table entry, the pad block (all NaN, owned by no sequence), and those
    rows are NaN; the other sequences' rows are unaffected."""
    if kernel == "triton":
        request.getfixturevalue("triton_interpret")
    cases = [(2, 16), (33, 33), (16, 16)]
    kv = make_paged_kv([n for _, n in cases], 16, 2, 32, seed=1)
    assert kv.block_tables[0, 1] == kv.pad_block and kv.k_cache[kv.pad_block].isnan().all()
    q, query_start_loc, starts = _queries(cases, 4, 32, torch.float32)
    lens = [17, 33, 16]
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, torch.tensor(lens, dtype=torch.int32),
            32**-0.5, 33, 33)
    out = paged_prefill_attention_ref(*args, starts, lens) if kernel == "ref" else paged_prefill_attention(*args)
    assert out[:2].isnan().all() and not out[2:].isnan().any()

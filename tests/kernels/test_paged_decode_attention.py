"""paged_decode_attention: the Triton kernel (interpreted) equals the torch reference, which equals
dense float64 attention, across block sizes, GQA ratios, lengths crossing block boundaries and dtypes."""

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvloom.kernels.paged_decode_attention import (
    GatherWorkspace,
    paged_decode_attention,
    paged_decode_attention_planned,
    paged_decode_attention_ref,
    plan_decode,
)

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _lens(block_size: int) -> list[int]:
    # One token, exactly one block, one past it, several blocks plus a few, more than a 64-key tile.
    return [1, block_size, block_size + 1, 3 * block_size + 3, 70]


def _strided_queries(num_seqs: int, num_q_heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, Hq, D]`` as a slice of a wider buffer (like a fused QKV output): non-unit row stride."""
    return torch.randn(num_seqs, num_q_heads + 3, head_dim, generator=torch.Generator().manual_seed(1)).to(
        dtype)[:, :num_q_heads]


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_ref_matches_dense(make_paged_kv: Callable[..., Any], dense_causal_attention: Callable[..., torch.Tensor],
                           block_size: int, group: int) -> None:
    lens = _lens(block_size)
    kv = make_paged_kv(lens, block_size, 2, 32)
    q = _strided_queries(len(lens), 2 * group, 32, torch.float32)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 32**-0.5, max(lens), out=out)
    for b in range(len(lens)):
        expected = dense_causal_attention(q[b: b + 1], kv.keys[b], kv.values[b], 32**-0.5)[0]
        torch.testing.assert_close(out[b].double(), expected, atol=1e-5, rtol=1e-5)


def test_ref_with_reused_workspace_matches_ref_without(make_paged_kv: Callable[..., Any]) -> None:
    workspace = GatherWorkspace()
    workspace.get(20_000, torch.float32, torch.device("cpu")).fill_(float("nan"))  # stale scratch
    for lens in ([3, 40, 17], [70, 1, 33, 16, 5], [2]):  # the buffer grows, then is reused smaller
        kv = make_paged_kv(lens, 16, 2, 32, seed=len(lens))
        q = _strided_queries(len(lens), 4, 32, torch.float32)
        args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 32**-0.5, max(lens))
        torch.testing.assert_close(paged_decode_attention_ref(*args, workspace=workspace),
                                   paged_decode_attention_ref(*args), atol=0, rtol=0)


def test_a_batch_split_into_length_groups_matches_dense(
        make_paged_kv: Callable[..., Any], dense_causal_attention: Callable[..., torch.Tensor]) -> None:
    # 40 sequences in shuffled length order, NaN in every slot nobody owns: the plan sorts them into
    # groups (rows gathered and scattered back by index), each padded only to its own longest row.
    lens = [int(n) for n in torch.randint(1, 90, (40,), generator=torch.Generator().manual_seed(3))]
    kv = make_paged_kv(lens, 16, 2, 32)
    groups = plan_decode(kv.block_tables, lens, 16, max_groups=4, min_group_rows=8)
    assert len(groups) == 4
    assert sorted(torch.cat([g.rows for g in groups if g.rows is not None]).tolist()) == list(range(40))
    assert sum(g.num_rows * g.num_blocks for g in groups) < len(lens) * max(-(-n // 16) for n in lens)
    q = _strided_queries(len(lens), 4, 32, torch.float32)
    out = paged_decode_attention_planned(q, kv.k_cache, kv.v_cache, groups, 32**-0.5,
                                         out=torch.full_like(q, float("nan")), workspace=GatherWorkspace())
    for b in range(len(lens)):
        expected = dense_causal_attention(q[b: b + 1], kv.keys[b], kv.values[b], 32**-0.5)[0]
        torch.testing.assert_close(out[b].double(), expected, atol=1e-5, rtol=1e-5)


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
        (16, 2, 2, 32, torch.float16),
        (16, 4, 2, 32, torch.bfloat16),
    ],
    ids=str,
)
def test_triton_matches_ref(make_paged_kv: Callable[..., Any], block_size: int, group: int, num_kv_heads: int,
                            head_dim: int, dtype: torch.dtype) -> None:
    lens = _lens(block_size)
    kv = make_paged_kv(lens, block_size, num_kv_heads, head_dim, dtype=dtype)
    q = _strided_queries(len(lens), num_kv_heads * group, head_dim, dtype)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))  # poisoned: a row the kernel skips stays NaN
    result = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale, max(lens),
                                    out=out)
    expected = paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale, max(lens))
    assert result is out and not out.isnan().any()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.usefixtures("triton_interpret")
def test_triton_allocates_output_when_none_given(make_paged_kv: Callable[..., Any]) -> None:
    kv = make_paged_kv([5, 17], 16, 1, 16)
    q = torch.randn(2, 2, 16)
    result = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.25, 17)
    expected = paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.25, 17)
    torch.testing.assert_close(result, expected, atol=2e-5, rtol=2e-5)



@pytest.mark.parametrize("kernel", ["ref", "triton"])
def test_a_kernel_reading_past_its_sequence_gets_nan(make_paged_kv: Callable[..., Any], kernel: str,
                                                     request: pytest.FixtureRequest) -> None:
    """What the NaN checks above rely on: told one key more than its full block, row 0 reads the
    next table entry, the pad block (all NaN, owned by no sequence), and is NaN; the other rows are
    unaffected. Block 0, the engine's padding, is row 0's own block here: a read of it would give a
    finite, wrong row."""
    if kernel == "triton":
        request.getfixturevalue("triton_interpret")
    kv = make_paged_kv([16, 33, 16], 16, 2, 32, seed=1)
    assert kv.block_tables[0, 0] == 0 and kv.block_tables[0, 1] == kv.pad_block
    assert kv.k_cache[kv.pad_block].isnan().all() and kv.v_cache[kv.pad_block].isnan().all()
    lens = kv.seq_lens.clone()
    lens[0] += 1
    attend = paged_decode_attention_ref if kernel == "ref" else paged_decode_attention
    out = attend(_strided_queries(3, 4, 32, torch.float32), kv.k_cache, kv.v_cache, kv.block_tables, lens,
                 32**-0.5, 34)
    assert out[0].isnan().all() and not out[1:].isnan().any()

"""The int8 KV cache (``kv_cache_dtype="int8"``, ``kernels.kv_int8``): rows quantized per token and kv head
are off by at most half a step, carry their scale in their last 4 bytes, and are written by ``store_kv_ref``;
the C attention kernel and the torch paths (decode gathers, prefills over cached blocks) read an int8 cache
as exactly the attention over its dequantized values, with q and out in float32 or bf16; and the cache of
68-byte rows holds 3.8x a float32 one's tokens in the same bytes."""

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvloom.kernels import kv_int8
from kvloom.kernels.paged_decode_attention import paged_decode_attention_ref
from kvloom.kernels.paged_decode_attention_cpu import paged_attention_rows_cpu
from kvloom.kernels.paged_decode_attention_cpu import paged_decode_attention_cpu as decode_cpu
from kvloom.kernels.paged_prefill_attention import paged_prefill_attention_ref
from kvloom.kernels.store_kv import store_kv_ref


def test_rows_are_off_by_at_most_half_a_step_and_carry_their_scale() -> None:
    x = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 10, 5)[:, None, None]
    x[2, 1] = 0.0
    rows = kv_int8.quantize_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (5, 3, 68) and kv_int8.head_dim(rows) == 64
    scale = rows[..., 64:].contiguous().view(torch.float32)
    assert torch.equal(scale[2, 1], torch.ones(1)) and torch.equal(rows[2, 1, :64], torch.zeros(64, dtype=torch.int8))
    back = kv_int8.dequantize_rows(rows)
    assert bool(((back - x).abs() <= scale / 2 * (1 + 1e-6)).all())
    assert kv_int8.row_width(64) * 1 * 3.76 < 64 * 4  # a float32 row's bytes hold 3.76 int8 rows


def test_store_kv_writes_quantized_rows_into_their_slots() -> None:
    k_cache = torch.zeros(4, 2, 2, 20, dtype=torch.int8)
    v_cache = torch.zeros_like(k_cache)
    key, value = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    store_kv_ref(key, value, k_cache, v_cache, torch.tensor([5, -1, 0]))
    flat_k = k_cache.view(-1, 2, 20)
    assert torch.equal(flat_k[5], kv_int8.quantize_rows(key[0])) and torch.equal(flat_k[0], kv_int8.quantize_rows(key[2]))
    assert torch.equal(v_cache.view(-1, 2, 20)[5], kv_int8.quantize_rows(value[0]))
    assert not flat_k[[1, 2, 3, 4, 6, 7]].any()  # the padding token (-1) wrote nothing


def _int8_kv(make_paged_kv: Callable[..., Any], lens: list[int], block_size: int, num_kv_heads: int,
             head_dim: int) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A paged K/V, its int8 caches (unused slots: NaN scales), and the float caches of their values."""
    kv = make_paged_kv(lens, block_size, num_kv_heads, head_dim)
    k8, v8 = kv_int8.quantize_rows(kv.k_cache), kv_int8.quantize_rows(kv.v_cache)
    return kv, k8, v8, kv_int8.dequantize_rows(k8), kv_int8.dequantize_rows(v8)


@pytest.mark.parametrize(("block_size", "group", "num_kv_heads", "head_dim"),
                         [(16, 1, 2, 64), (16, 4, 4, 64), (5, 3, 2, 40), (32, 8, 1, 128)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_c_kernel_reads_int8_as_its_dequantized_values(
        make_paged_kv: Callable[..., Any], block_size: int, group: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype) -> None:
    lens = [1, block_size, block_size + 1, 3 * block_size + 3, 300]
    kv, k8, v8, kf, vf = _int8_kv(make_paged_kv, lens, block_size, num_kv_heads, head_dim)
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    decode_cpu(q, k8, v8, kv.block_tables, kv.seq_lens, scale, max(lens), out=out)
    expected = paged_decode_attention_ref(q.float(), kf, vf, kv.block_tables, kv.seq_lens, scale, max(lens))
    assert out.dtype == dtype and not out.isnan().any()
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_the_c_kernel_takes_prefill_rows_over_an_int8_cache(make_paged_kv: Callable[..., Any]) -> None:
    kv, k8, v8, kf, vf = _int8_kv(make_paged_kv, [40], 16, 2, 32)
    q = torch.randn(40, 4, 32, generator=torch.Generator().manual_seed(2))
    row_lens = torch.arange(1, 41, dtype=torch.int32)  # causal: row p attends p + 1 keys
    got = paged_attention_rows_cpu(q, k8, v8, kv.block_tables, torch.zeros(40, dtype=torch.int32), row_lens, 0.2)
    ref = paged_attention_rows_cpu(q, kf.contiguous(), vf.contiguous(), kv.block_tables,
                                   torch.zeros(40, dtype=torch.int32), row_lens, 0.2)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=2e-6)


def test_the_torch_paths_read_int8_as_its_dequantized_values(make_paged_kv: Callable[..., Any]) -> None:
    lens = [3, 17, 40]
    kv, k8, v8, kf, vf = _int8_kv(make_paged_kv, lens, 16, 2, 32)
    q = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(3))
    got = paged_decode_attention_ref(q, k8, v8, kv.block_tables, kv.seq_lens, 0.2, 40)
    torch.testing.assert_close(got, paged_decode_attention_ref(q, kf, vf, kv.block_tables, kv.seq_lens, 0.2, 40))
    # Prefills: the last 5 tokens of each sequence as a chunk over its cached prefix, and whole prompts.
    for query_lens in ([5, 5, 5], lens):
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        qp = torch.randn(starts[-1], 4, 32, generator=torch.Generator().manual_seed(4))
        qsl = torch.tensor(starts, dtype=torch.int32)
        got = paged_prefill_attention_ref(qp, k8, v8, kv.block_tables, qsl, kv.seq_lens, 0.2, max(query_lens), 40)
        ref = paged_prefill_attention_ref(qp, kf, vf, kv.block_tables, qsl, kv.seq_lens, 0.2, max(query_lens), 40)
        torch.testing.assert_close(got, ref)


@pytest.mark.usefixtures("triton_interpret")
def test_the_triton_kernels_read_and_write_int8_as_the_torch_paths_do(make_paged_kv: Callable[..., Any]) -> None:
    """Interpreted at small sizes: store_kv writes the same rows as the reference; decode and prefill
    attention over int8 caches equal the torch paths over them (float32 dots)."""
    from kvloom.kernels.paged_decode_attention import paged_decode_attention
    from kvloom.kernels.paged_prefill_attention import paged_prefill_attention
    from kvloom.kernels.store_kv import store_kv

    k_ref, v_ref = torch.zeros(4, 2, 2, 20, dtype=torch.int8), torch.zeros(4, 2, 2, 20, dtype=torch.int8)
    k_tri, v_tri = k_ref.clone(), v_ref.clone()
    key, value, slots = torch.randn(3, 2, 16), torch.randn(3, 2, 16), torch.tensor([5, -1, 0])
    store_kv_ref(key, value, k_ref, v_ref, slots)
    store_kv(key, value, k_tri, v_tri, slots)
    assert torch.equal(k_ref, k_tri) and torch.equal(v_ref, v_tri)

    lens = [1, 16, 17, 40]
    kv, k8, v8, _, _ = _int8_kv(make_paged_kv, lens, 16, 2, 32)
    q = torch.randn(4, 4, 32, generator=torch.Generator().manual_seed(6))
    got = paged_decode_attention(q, k8, v8, kv.block_tables, kv.seq_lens, 0.2, 40)
    torch.testing.assert_close(got, paged_decode_attention_ref(q, k8, v8, kv.block_tables, kv.seq_lens, 0.2, 40),
                               atol=2e-5, rtol=2e-5)
    query_lens = [1, 5, 17, 40]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    qp = torch.randn(starts[-1], 4, 32, generator=torch.Generator().manual_seed(7))
    args = (qp, k8, v8, kv.block_tables, torch.tensor(starts, dtype=torch.int32), kv.seq_lens, 0.2, 40, 40)
    torch.testing.assert_close(paged_prefill_attention(*args), paged_prefill_attention_ref(*args, starts, lens),
                               atol=2e-5, rtol=2e-5)

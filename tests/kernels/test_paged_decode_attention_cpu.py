"""paged_decode_attention_cpu, the C kernel for decode rows (and, as paged_attention_rows_cpu, for any
query rows, a prefill's among them): equal to dense float64 attention across block sizes,
GQA groups, head sizes and lengths (slots nobody owns hold NaN), in float32 and bf16; exact at the
edges of its exp (scores far below the row's max underflow to 0, never NaN); the same bits on one
thread or two; inputs that would read outside the caches are refused before anything is read. The
build: cached per machine kind, flags chosen by CPU capability (both vector widths, and none, are
compiled; what this CPU can run is also run), and a clear error where no compiler exists.
"""

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvloom.kernels import native, paged_decode_attention_cpu
from kvloom.kernels.paged_decode_attention import paged_decode_attention_ref
from kvloom.kernels.paged_decode_attention_cpu import paged_attention_rows_cpu
from kvloom.kernels.paged_decode_attention_cpu import paged_decode_attention_cpu as decode_cpu


def _lens(block_size: int) -> list[int]:
    # One token, exactly one block, one past it, several blocks plus a few, a long row.
    return [1, block_size, block_size + 1, 3 * block_size + 3, 300]


def _queries(num_seqs: int, num_q_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """``[B, Hq, D]`` as a slice of a wider buffer (like a fused QKV output): strided rows."""
    return torch.randn(num_seqs, num_q_heads + 3, head_dim, generator=torch.Generator().manual_seed(seed)).to(
        dtype)[:, :num_q_heads]


def _expected(q: torch.Tensor, kv: Any, scale: float, dense: Callable[..., torch.Tensor]) -> torch.Tensor:
    return torch.stack([dense(q[b: b + 1], kv.keys[b], kv.values[b], scale)[0] for b in range(q.shape[0])])


@pytest.mark.parametrize(
    ("block_size", "group", "num_kv_heads", "head_dim"),
    # The kernel has vector paths (four q heads a kv head, eight q heads at once, 16 columns at once)
    # and scalar ones for the rest: these cases take each, and mixes of both within one call.
    [(1, 1, 2, 32), (16, 1, 2, 64), (16, 4, 4, 64), (16, 3, 2, 40), (32, 8, 1, 128), (16, 6, 2, 8), (5, 2, 2, 16),
     (16, 4, 1, 24), (7, 12, 2, 48)],
    ids=str,
)
def test_float32_matches_dense_attention(make_paged_kv: Callable[..., Any], dense_causal_attention: Callable[..., Any],
                                         block_size: int, group: int, num_kv_heads: int, head_dim: int) -> None:
    lens = _lens(block_size)
    kv = make_paged_kv(lens, block_size, num_kv_heads, head_dim)
    q = _queries(len(lens), num_kv_heads * group, head_dim, torch.float32)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))  # poisoned: a row the kernel skips stays NaN
    result = decode_cpu(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale, max(lens), out=out)
    assert result is out and not out.isnan().any()
    torch.testing.assert_close(out.double(), _expected(q, kv, scale, dense_causal_attention), atol=2e-6, rtol=2e-6)


def test_bfloat16_matches_dense_attention_of_the_same_values(
        make_paged_kv: Callable[..., Any], dense_causal_attention: Callable[..., Any]) -> None:
    lens = _lens(16)
    kv = make_paged_kv(lens, 16, 2, 64, dtype=torch.bfloat16)
    q = _queries(len(lens), 8, 64, torch.bfloat16)
    out = decode_cpu(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125, max(lens))
    assert out.dtype == torch.bfloat16
    expected = _expected(q, kv, 0.125, dense_causal_attention)
    # float32 inside, one rounding to bf16 at the end: within half a bf16 ulp (2^-8 relative) plus float32 noise.
    assert ((out.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-5).all()


def test_matches_the_torch_reference_on_a_64_sequence_batch(make_paged_kv: Callable[..., Any]) -> None:
    lens = [int(n) for n in torch.randint(100, 330, (64,), generator=torch.Generator().manual_seed(7))]
    kv = make_paged_kv(lens, 16, 4, 64)
    q = _queries(len(lens), 16, 64, torch.float32)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125, max(lens))
    torch.testing.assert_close(decode_cpu(*args), paged_decode_attention_ref(*args), atol=2e-6, rtol=2e-6)


def test_scores_far_below_the_max_underflow_to_zero_not_nan(make_paged_kv: Callable[..., Any],
                                                             dense_causal_attention: Callable[..., Any]) -> None:
    # Scores spread over hundreds: most exp() arguments fall below float32's range (about -87.3) and
    # must contribute exactly 0; the rest must still be exact.
    lens = [40, 200]
    kv = make_paged_kv(lens, 16, 1, 32)
    for b, n in enumerate(lens):
        kv.keys[b][:, 0, 0] = torch.linspace(-30.0, 30.0, n)
        for pos in range(n):
            kv.k_cache[kv.block_tables[b, pos // 16], pos % 16, 0, 0] = kv.keys[b][pos, 0, 0]
    q = torch.zeros(2, 2, 32)
    q[:, :, 0] = torch.tensor([[20.0, -7.0], [3.0, 0.5]])
    out = decode_cpu(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 1.0, max(lens))
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), _expected(q, kv, 1.0, dense_causal_attention), atol=2e-6, rtol=2e-6)


def test_a_zero_length_row_is_zero_and_the_others_are_unaffected(make_paged_kv: Callable[..., Any]) -> None:
    kv = make_paged_kv([9, 33], 16, 2, 16)
    q = _queries(2, 4, 16, torch.float32)
    lens = kv.seq_lens.clone()
    lens[0] = 0
    out = decode_cpu(q, kv.k_cache, kv.v_cache, kv.block_tables, lens, 0.25, 33)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    expected = decode_cpu(q[1:], kv.k_cache, kv.v_cache, kv.block_tables[1:], kv.seq_lens[1:], 0.25, 33)
    assert torch.equal(out[1], expected[0])


def test_one_thread_and_two_give_the_same_bits(make_paged_kv: Callable[..., Any]) -> None:
    lens = [int(n) for n in torch.randint(1, 200, (24,), generator=torch.Generator().manual_seed(2))]
    kv = make_paged_kv(lens, 16, 2, 64)
    q = _queries(len(lens), 8, 64, torch.float32)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125, max(lens))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = decode_cpu(*args)
        torch.set_num_threads(2)
        double = decode_cpu(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, double)  # each sequence is one thread's work, whatever the split


def test_a_read_past_its_sequence_gets_nan(make_paged_kv: Callable[..., Any]) -> None:
    """What the NaN checks above rely on: told one key more than its full block, row 0 reads the
    next table entry, the pad block (all NaN, owned by no sequence), and is NaN. Block 0, the
    engine's padding, is row 0's own block here: a read of it would give a finite, wrong row."""
    kv = make_paged_kv([16, 33, 16], 16, 2, 32, seed=1)
    assert kv.block_tables[0, 0] == 0 and kv.block_tables[0, 1] == kv.pad_block
    assert kv.k_cache[kv.pad_block].isnan().all() and kv.v_cache[kv.pad_block].isnan().all()
    lens = kv.seq_lens.clone()
    lens[0] += 1
    out = decode_cpu(_queries(3, 4, 32, torch.float32), kv.k_cache, kv.v_cache, kv.block_tables, lens, 0.2, 34)
    assert out[0].isnan().all() and not out[1:].isnan().any()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("block_id", "outside block_tables or the caches"),
        ("negative_block_id", "outside block_tables or the caches"),
        ("length_past_table", "outside block_tables or the caches"),
        ("float16", "unsupported: dtype torch.float16"),
        ("head_dim", "head_dim a multiple of 8"),
        ("int64_tables", "block_tables must be int32"),
        ("dtype_mismatch", "differ"),
    ],
)
def test_inputs_that_would_read_outside_the_caches_are_refused(make_paged_kv: Callable[..., Any], change: str,
                                                              message: str) -> None:
    kv = make_paged_kv([20, 5], 16, 2, 16)
    q, k_cache, v_cache, tables, lens = _queries(2, 4, 16, torch.float32), kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens
    if change == "block_id":
        tables = tables.clone()
        tables[0, 1] = k_cache.shape[0]
    elif change == "negative_block_id":
        tables = tables.clone()
        tables[1, 0] = -1
    elif change == "length_past_table":
        lens = torch.tensor([16 * tables.shape[1] + 1, 5], dtype=torch.int32)
    elif change == "float16":
        q, k_cache, v_cache = q.half(), k_cache.half(), v_cache.half()
    elif change == "head_dim":
        q, k_cache, v_cache = q[..., :12], k_cache[..., :12].contiguous(), v_cache[..., :12].contiguous()
    elif change == "int64_tables":
        tables = tables.long()
    else:
        q = q.bfloat16()
    out = torch.full((2, 4, q.shape[2]), 7.0, dtype=q.dtype)
    with pytest.raises(ValueError, match=message):
        decode_cpu(q, k_cache, v_cache, tables, lens, 0.25, 20, out=out)
    assert (out == 7.0).all(), "nothing written"


def test_rows_attend_their_sequences_prefix_causally_as_a_prefill_does(
        make_paged_kv: Callable[..., Any], dense_causal_attention: Callable[..., Any]) -> None:
    # Two prompts of 37 and 20 tokens, every row of each a query row: row p of a sequence attends its
    # first p + 1 keys. A trailing row with length 0 is a padding row (zeros).
    lens = [37, 20]
    kv = make_paged_kv(lens, 16, 2, 32)
    q = _queries(sum(lens) + 1, 8, 32, torch.float32)
    row_seq = torch.tensor([0] * 37 + [1] * 20 + [0], dtype=torch.int32)
    row_lens = torch.tensor([*range(1, 38), *range(1, 21), 0], dtype=torch.int32)
    out = paged_attention_rows_cpu(q, kv.k_cache, kv.v_cache, kv.block_tables, row_seq, row_lens, 0.2)
    expected = torch.cat([dense_causal_attention(q[:37], kv.keys[0], kv.values[0], 0.2),
                          dense_causal_attention(q[37:57], kv.keys[1], kv.values[1], 0.2)])
    torch.testing.assert_close(out[:57].double(), expected, atol=2e-6, rtol=2e-6)
    assert (out[57] == 0).all()


@pytest.mark.parametrize(("row", "value"), [("seq", 2), ("seq", -1), ("len", "past_table"), ("len", -1)])
def test_rows_that_name_no_sequence_or_more_keys_than_their_table_holds_are_refused(
        make_paged_kv: Callable[..., Any], row: str, value: int | str) -> None:
    kv = make_paged_kv([37, 20], 16, 2, 16)
    row_seq, row_lens = torch.tensor([0, 1, 1], dtype=torch.int32), torch.tensor([37, 20, 3], dtype=torch.int32)
    past_table = 16 * kv.block_tables.shape[1] + 1
    (row_seq if row == "seq" else row_lens)[2] = past_table if value == "past_table" else value
    out = torch.full((3, 4, 16), 7.0)
    with pytest.raises(ValueError, match="outside block_tables"):
        paged_attention_rows_cpu(_queries(3, 4, 16, torch.float32), kv.k_cache, kv.v_cache, kv.block_tables,
                                 row_seq, row_lens, 0.25, out=out)
    assert (out == 7.0).all(), "nothing written"


# ---- the build ---------------------------------------------------------------------------


def test_flags_follow_the_cpu_capability() -> None:
    assert "-mavx512f" in native.compile_flags("AVX512") and "-mfma" in native.compile_flags("AVX512")
    assert "-mavx2" in native.compile_flags("AVX2") and "-mavx512f" not in native.compile_flags("AVX2")
    assert not any(flag.startswith("-m") for flag in native.compile_flags("DEFAULT"))
    assert "-march=native" not in native.compile_flags()


def test_a_build_is_cached_and_keyed_by_its_flags(fresh_kernel_cache: Path) -> None:
    first = native.build(paged_decode_attention_cpu.SOURCE)
    assert first.parent == fresh_kernel_cache / "native" and first.exists()
    mtime = first.stat().st_mtime_ns
    assert native.build(paged_decode_attention_cpu.SOURCE) == first and first.stat().st_mtime_ns == mtime
    other = native.build(paged_decode_attention_cpu.SOURCE, flags=native.compile_flags("DEFAULT"))
    assert other != first and other.exists()
    assert not list((fresh_kernel_cache / "native").glob("*.partial"))


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_every_capability_compiles_and_the_ones_this_cpu_runs_agree(
        fresh_kernel_cache: Path, make_paged_kv: Callable[..., Any], capability: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = native.build(paged_decode_attention_cpu.SOURCE, flags=native.compile_flags(capability))
    assert path.exists() and path.parent == fresh_kernel_cache / "native"
    runnable = {"DEFAULT": True, "AVX2": torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"),
                "AVX512": torch.backends.cpu.get_cpu_capability() == "AVX512"}
    if not runnable[capability]:
        return  # compiled (asserted above); this CPU cannot execute it
    entries = paged_decode_attention_cpu.bind(ctypes.CDLL(str(path)))
    lens = _lens(16)
    kv = make_paged_kv(lens, 16, 2, 64)
    q = _queries(len(lens), 8, 64, torch.float32)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125, max(lens))
    expected = paged_decode_attention_ref(*args)
    monkeypatch.setattr(paged_decode_attention_cpu, "load", lambda: entries)
    torch.testing.assert_close(decode_cpu(*args), expected, atol=2e-6, rtol=2e-6)


def test_no_compiler_is_a_clear_error(fresh_kernel_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(native.NativeBuildError, match=r"no C compiler: '/nonexistent/cc' is not on PATH"):
        paged_decode_attention_cpu.load()


def test_a_compile_error_shows_the_compilers_message(fresh_kernel_cache: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.c").write_text("int f(void) { return undefined_name; }\n")
    with pytest.raises(native.NativeBuildError, match=r"compiling broken.c failed[\s\S]*undefined_name"):
        native.build("broken", sources=tmp_path, directory=tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))

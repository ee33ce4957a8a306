"""Attention backends over a mixed batch: decodes, fresh prompts and chunks continuing a cached prefix.

The torch backend must equal dense float64 causal attention computed from contiguous K/V; so must the
cpu backend (the CPU production path: decode rows and short prefills in a C kernel, longer prefills on
SDPA); the triton backend (run on CPU
through Triton's interpreter) must equal the torch one.
"""

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# triton's jit'd library is interpreted only if this is set before triton is imported (see
# tests/kernels/conftest.py); kvloom itself never imports triton at import time.
if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvloom.kernels import native
from kvloom.kernels.store_kv import store_kv_ref
from kvloom.layers.attention import (
    AttentionBackend,
    CpuAttentionBackend,
    TorchAttentionBackend,
    TritonAttentionBackend,
    get_attention_backend,
)
from kvloom.layers.attention_metadata import AttentionMetadata
from kvloom.layers.cpu_support import CpuMatmulSupport
from tests.fakes import fake_cpu

NUM_KV_HEADS, GROUP, HEAD_DIM = 2, 4, 32
SCALE = HEAD_DIM**-0.5
# (query_len, seq_len) per sequence; decodes (query_len 1) first, as the runner orders them.
DECODES = [(1, 1), (1, 16), (1, 17), (1, 40)]
PREFILLS = [(5, 5), (16, 16), (33, 33), (7, 23), (20, 50), (16, 64)]  # last three continue a cached prefix


@dataclass
class Batch:
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D]: the new tokens' keys, not yet in the cache
    v: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]: cached prefixes written, the rest NaN
    v_cache: torch.Tensor
    meta: AttentionMetadata
    keys: list[torch.Tensor]  # per sequence, [seq_len, Hkv, D]: every key, prefix and new
    values: list[torch.Tensor]


def _make_batch(specs: list[tuple[int, int]], num_decodes: int, block_size: int, num_pad_tokens: int = 0) -> Batch:
    """Random K/V per sequence; cached prefixes are written, the new tokens are returned in ``k``/``v``.
    ``num_pad_tokens`` extra rows (slot -1) trail the batch, as a padded (CUDA-graph) batch would."""
    gen = torch.Generator().manual_seed(block_size)
    blocks_per_seq = [-(-seq_len // block_size) for _, seq_len in specs]
    num_blocks = sum(blocks_per_seq) + 2
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    block_tables = torch.zeros(len(specs), max(blocks_per_seq), dtype=torch.int32)
    free = torch.randperm(num_blocks, generator=gen).tolist()  # shuffled, non-contiguous blocks
    keys, values, queries, new_slots = [], [], [], []
    for b, (query_len, seq_len) in enumerate(specs):
        table = [free.pop() for _ in range(blocks_per_seq[b])]
        block_tables[b, : len(table)] = torch.tensor(table, dtype=torch.int32)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(seq_len)])
        key = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        value = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        context_len = seq_len - query_len
        store_kv_ref(key[:context_len], value[:context_len], k_cache, v_cache, slots[:context_len])
        keys.append(key)
        values.append(value)
        queries.append(torch.randn(query_len, NUM_KV_HEADS * GROUP, HEAD_DIM, generator=gen))
        new_slots.append(slots[context_len:])
    starts = [0]
    for query_len, _ in specs:
        starts.append(starts[-1] + query_len)
    seq_lens = [seq_len for _, seq_len in specs]
    pad = num_pad_tokens
    meta = AttentionMetadata(
        num_decodes=num_decodes,
        slot_mapping=torch.cat([*new_slots, torch.full((pad,), -1)]),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        max_query_len=max(query_len for query_len, _ in specs),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    new_k = torch.cat([key[seq_len - query_len:] for key, (query_len, seq_len) in zip(keys, specs, strict=True)])
    new_v = torch.cat([val[seq_len - query_len:] for val, (query_len, seq_len) in zip(values, specs, strict=True)])
    return Batch(
        q=torch.cat([*queries, torch.randn(pad, NUM_KV_HEADS * GROUP, HEAD_DIM, generator=gen)]),
        k=torch.cat([new_k, torch.randn(pad, NUM_KV_HEADS, HEAD_DIM, generator=gen)]),
        v=torch.cat([new_v, torch.randn(pad, NUM_KV_HEADS, HEAD_DIM, generator=gen)]),
        k_cache=k_cache, v_cache=v_cache, meta=meta, keys=keys, values=values,
    )


def _dense_attention(batch: Batch) -> torch.Tensor:
    """float64 causal attention per sequence from contiguous K/V: ``[num_query_tokens, Hq, D]``."""
    outputs = []
    for b, (key, value) in enumerate(zip(batch.keys, batch.values, strict=True)):
        start, end = batch.meta.query_start_loc_cpu[b], batch.meta.query_start_loc_cpu[b + 1]
        q = batch.q[start:end].double()
        query_len, seq_len = end - start, key.shape[0]
        k = key.double().repeat_interleave(GROUP, dim=1)
        v = value.double().repeat_interleave(GROUP, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * SCALE
        hidden = torch.arange(seq_len)[None, :] > torch.arange(seq_len - query_len, seq_len)[:, None]
        outputs.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(hidden, float("-inf")).softmax(-1), v))
    return torch.cat(outputs)


def _forward(backend: AttentionBackend, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    out = backend.forward(batch.q, batch.k, batch.v, k_cache, v_cache, batch.meta, SCALE)
    return out, k_cache, v_cache


# 36 decodes of spread lengths: enough for the torch backend to split them into length groups.
MANY_DECODES = [(1, 1 + (i * 37) % 90) for i in range(36)]
BATCHES = {  # name: (specs, num_decodes)
    "mixed": (DECODES + PREFILLS, len(DECODES)),
    "many_decodes_mixed": (MANY_DECODES + PREFILLS, len(MANY_DECODES)),
    "decodes_only": (DECODES, len(DECODES)),
    "prefills_only": (PREFILLS, 0),
}


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("kind", list(BATCHES))
def test_torch_backend_matches_dense_attention(kind: str, block_size: int) -> None:
    batch = _make_batch(*BATCHES[kind], block_size)
    out, k_cache, v_cache = _forward(TorchAttentionBackend(), batch)
    num_tokens = batch.meta.query_start_loc_cpu[-1]
    torch.testing.assert_close(out.double(), _dense_attention(batch), atol=1e-5, rtol=1e-5)
    # The new tokens' K/V are in the cache at their slots.
    slots = batch.meta.slot_mapping[:num_tokens]
    assert torch.equal(k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots], batch.k[:num_tokens])
    assert torch.equal(v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots], batch.v[:num_tokens])


def test_torch_backend_plans_a_step_once_and_every_layer_reuses_the_plan() -> None:
    batch = _make_batch(MANY_DECODES + PREFILLS, len(MANY_DECODES), 16)
    backend = TorchAttentionBackend()
    first, _, _ = _forward(backend, batch)
    plan = batch.meta.backend_plan
    assert plan is not None and len(plan.decode_groups) == 2, "36 decodes: two groups of similar length"
    again, _, _ = _forward(backend, batch)  # the next layer of the same step
    assert batch.meta.backend_plan is plan
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(first.double(), _dense_attention(batch), atol=1e-5, rtol=1e-5)


def test_torch_backend_ignores_padding_tokens() -> None:
    batch = _make_batch(DECODES + PREFILLS, len(DECODES), 16, num_pad_tokens=3)
    untouched = batch.k_cache.isnan()
    out, k_cache, _ = _forward(TorchAttentionBackend(), batch)
    num_tokens = batch.meta.query_start_loc_cpu[-1]
    torch.testing.assert_close(out[:num_tokens].double(), _dense_attention(batch), atol=1e-5, rtol=1e-5)
    written = torch.zeros_like(untouched)
    written.view(-1, NUM_KV_HEADS, HEAD_DIM)[batch.meta.slot_mapping[:num_tokens]] = True
    assert k_cache[untouched & ~written].isnan().all()  # padding wrote nothing


@pytest.mark.parametrize("kind", list(BATCHES))
def test_triton_backend_matches_torch_backend(kind: str) -> None:
    triton = pytest.importorskip("triton", reason="triton is not installed: the triton backend is not tested")
    if isinstance(triton.language.zeros, triton.JITFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: its library is not interpreted")
    batch = _make_batch(*BATCHES[kind], 16)
    expected, expected_k, expected_v = _forward(TorchAttentionBackend(), batch)
    out, k_cache, v_cache = _forward(get_attention_backend("triton", torch.device("cpu")), batch)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(k_cache, expected_k, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, expected_v, equal_nan=True, atol=0, rtol=0)


def test_registry_picks_and_rejects_backends() -> None:
    auto = get_attention_backend("auto", torch.device("cpu"))
    assert type(auto) is CpuAttentionBackend, "this machine has a C compiler: auto takes the C decode kernel"
    assert "C decode kernel built" in auto.reason
    assert type(get_attention_backend("torch", "cpu")) is TorchAttentionBackend
    assert type(get_attention_backend("cpu", "cpu")) is CpuAttentionBackend
    if importlib.util.find_spec("triton") is not None:
        assert isinstance(get_attention_backend("triton", "cpu"), TritonAttentionBackend)
        assert isinstance(get_attention_backend("auto", torch.device("cuda")), TritonAttentionBackend)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'.*auto, torch, cpu, triton"):
        get_attention_backend("flash", "cpu")
    with pytest.raises(ValueError, match=r"'cpu' attention backend runs on CPU tensors"):
        get_attention_backend("cpu", torch.device("cuda"))


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("kind", list(BATCHES))
def test_cpu_backend_matches_dense_attention_and_the_torch_backend(kind: str, block_size: int) -> None:
    batch = _make_batch(*BATCHES[kind], block_size)
    out, k_cache, v_cache = _forward(CpuAttentionBackend(), batch)
    torch.testing.assert_close(out.double(), _dense_attention(batch), atol=1e-5, rtol=1e-5)
    batch.meta.backend_plan = None  # the torch backend plans decode groups of its own
    expected, expected_k, expected_v = _forward(TorchAttentionBackend(), batch)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(k_cache, expected_k, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(v_cache, expected_v, equal_nan=True, atol=0, rtol=0)


def test_cpu_backend_attends_every_row_in_one_kernel_call_and_ignores_padding_tokens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kvloom.kernels import paged_decode_attention_cpu, paged_prefill_attention

    calls: list[str] = []
    for module, name in ((paged_decode_attention_cpu, "paged_attention_rows_cpu"),
                         (paged_prefill_attention, "paged_prefill_attention_planned")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    batch = _make_batch(MANY_DECODES + PREFILLS, len(MANY_DECODES), 16, num_pad_tokens=3)
    untouched = batch.k_cache.isnan()
    out, k_cache, _ = _forward(CpuAttentionBackend(), batch)
    assert calls == ["paged_attention_rows_cpu"], "decodes, fresh prompts and chunks: one call, no SDPA"
    plan = batch.meta.backend_plan
    positions = [p for q_len, seq_len in MANY_DECODES + PREFILLS for p in range(seq_len - q_len, seq_len)]
    assert plan.row_lens.tolist() == [p + 1 for p in positions] + [0, 0, 0], "causal: position + 1 keys; padding 0"
    assert plan.long_prefill == []
    num_tokens = batch.meta.query_start_loc_cpu[-1]
    torch.testing.assert_close(out[:num_tokens].double(), _dense_attention(batch), atol=1e-5, rtol=1e-5)
    assert (out[num_tokens:] == 0).all()
    written = torch.zeros_like(untouched)
    written.view(-1, NUM_KV_HEADS, HEAD_DIM)[batch.meta.slot_mapping[:num_tokens]] = True
    assert k_cache[untouched & ~written].isnan().all()


def test_cpu_backend_leaves_prefills_over_many_keys_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    # With the limit at 20 keys: the 33-token prompt and the chunks over 23, 50 and 64 keys go to SDPA
    # (the last three are chunks over a cached prefix); decodes of any length, and the short prompts, stay.
    monkeypatch.setattr(CpuAttentionBackend, "MAX_KERNEL_PREFILL_KEYS", 20)
    batch = _make_batch(DECODES + PREFILLS, len(DECODES), 16)
    out = _forward(CpuAttentionBackend(), batch)[0]
    plan = batch.meta.backend_plan
    starts = batch.meta.query_start_loc_cpu
    assert [(seq.start, seq.end, seq.seq_len) for seq in plan.long_prefill] == [
        (starts[b], starts[b + 1], seq_len) for b, (_, seq_len) in enumerate(DECODES + PREFILLS)
        if b >= len(DECODES) and seq_len > 20]
    assert [seq.mask is None for seq in plan.long_prefill] == [True, False, False, False]
    for seq in plan.long_prefill:
        assert (plan.row_lens[seq.start:seq.end] == 0).all()
    torch.testing.assert_close(out.double(), _dense_attention(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("amx", [True, False])
def test_the_backend_asks_the_same_probe_as_the_dtype_choice(amx: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cpu(monkeypatch, CpuMatmulSupport(amx=amx, avx512_bf16=amx))
    assert CpuAttentionBackend().amx is amx


@pytest.mark.parametrize("amx", [True, False])
def test_bf16_prefills_go_to_sdpa_sooner_where_the_cpu_has_amx(amx: bool) -> None:
    # With AMX, SDPA's flash kernel multiplies bf16 on the tiles: every prefill over 32 keys goes to it.
    # Without, bf16 keeps the float32 limit. float32 keeps it either way. Decided with AMX faked both ways.
    backend = CpuAttentionBackend(amx=amx)
    assert backend.max_kernel_prefill_keys(torch.float32) == CpuAttentionBackend.MAX_KERNEL_PREFILL_KEYS
    assert backend.max_kernel_prefill_keys(torch.bfloat16) == (
        CpuAttentionBackend.MAX_KERNEL_PREFILL_KEYS_AMX_BF16 if amx else CpuAttentionBackend.MAX_KERNEL_PREFILL_KEYS)
    batch = _make_batch(DECODES + PREFILLS, len(DECODES), 16)
    bf16 = {name: getattr(batch, name).to(torch.bfloat16) for name in ("q", "k", "v", "k_cache", "v_cache")}
    out = backend.forward(bf16["q"], bf16["k"], bf16["v"], bf16["k_cache"], bf16["v_cache"], batch.meta, SCALE)
    plan = batch.meta.backend_plan
    starts = batch.meta.query_start_loc_cpu
    expected = [starts[b] for b, (_, seq_len) in enumerate(DECODES + PREFILLS)
                if b >= len(DECODES) and seq_len > 32] if amx else []
    assert [seq.start for seq in plan.long_prefill] == expected
    if amx:
        assert len(expected) == 3, "the 33-token prompt and the chunks over 50 and 64 keys"
    # bf16 inputs: the result within a few bf16 roundings of float64 attention on the same (rounded) inputs.
    reference = _dense_attention(Batch(q=bf16["q"].double(), k=batch.k, v=batch.v, k_cache=batch.k_cache,
                                       v_cache=batch.v_cache, meta=batch.meta,
                                       keys=[k.to(torch.bfloat16).double() for k in batch.keys],
                                       values=[v.to(torch.bfloat16).double() for v in batch.values]))
    torch.testing.assert_close(out.double(), reference, atol=3e-2, rtol=2e-2)


def test_cpu_backend_runs_caches_the_kernel_cannot_take_on_the_torch_path() -> None:
    batch = _make_batch(DECODES + PREFILLS, len(DECODES), 16)
    half = {name: getattr(batch, name).half() for name in ("q", "k", "v", "k_cache", "v_cache")}
    backend = CpuAttentionBackend()
    out = backend.forward(half["q"], half["k"], half["v"], half["k_cache"], half["v_cache"], batch.meta, SCALE)
    assert batch.meta.backend_plan.decode_groups, "float16: decode rows planned for SDPA over gathers"
    torch.testing.assert_close(out.double(), _dense_attention(batch), atol=5e-3, rtol=5e-3)


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch, fresh_kernel_cache: Path) -> None:
    """No C compiler, an empty kernel cache, and no build already loaded in this process."""
    monkeypatch.setenv("CC", "/nonexistent/cc")


@pytest.mark.usefixtures("no_compiler")
def test_auto_falls_back_to_torch_and_says_why_without_a_compiler(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="kvloom.layers.attention"):
        backend = get_attention_backend("auto", "cpu")
    assert type(backend) is TorchAttentionBackend
    assert "cannot be built" in backend.reason and "/nonexistent/cc" in backend.reason
    assert any("falls back to torch" in record.getMessage() for record in caplog.records)
    with pytest.raises(native.NativeBuildError, match="no C compiler"):
        get_attention_backend("cpu", "cpu")


def test_an_engine_on_the_cpu_backend_generates_what_the_torch_backend_does(llama_dir: Path) -> None:
    from kvloom import LLM, SamplingParams

    prompts = [[5 + i, 17, 3 * i + 1, 9, 40 + i][: 2 + i % 4] * (1 + i % 3) for i in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    results = {}
    for name in ("torch", "cpu"):
        llm = LLM(llama_dir, num_kv_blocks=64, block_size=4, attention_backend=name)
        try:
            assert llm.core.attention_backend == (name, "chosen by name")
            results[name] = llm.generate(prompts[:1], params) + llm.generate(prompts[1:], params)  # alone, batched
        finally:
            llm.close()
    for cpu, torch_ in zip(results["cpu"], results["torch"], strict=True):
        assert cpu.token_ids == torch_.token_ids
        cpu_lp = [e.logprob for e in cpu.choices[0].logprobs]
        torch_lp = [e.logprob for e in torch_.choices[0].logprobs]
        torch.testing.assert_close(torch.tensor(cpu_lp), torch.tensor(torch_lp), atol=1e-5, rtol=0)


@pytest.mark.anyio
async def test_stats_name_the_attention_backend_and_why(llama_dir: Path) -> None:
    from kvloom import AsyncEngine

    async with AsyncEngine.from_pretrained(llama_dir, num_kv_blocks=32) as engine:
        stats = engine.stats()
    assert stats.attention_backend == "cpu" and stats.attention_reason is not None
    assert "C decode kernel built" in stats.attention_reason

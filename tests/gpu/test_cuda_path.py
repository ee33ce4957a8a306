"""The CUDA path, on a CUDA device: compiled Triton kernels, the engine, CUDA graphs, bf16.

Every test here needs a GPU and is skipped (visibly) without one; the CPU suite covers the same
kernels through Triton's interpreter. Run them with the compiled kernels:

    TRITON_INTERPRET=0 pytest tests/gpu

References: each kernel against its torch reference computed on the CPU in float64 (so neither
TF32 nor a GPU reduction order hides in the oracle); the engine in float32 against transformers
on the same GPU (no TF32 for either: torch's default for float32 matmuls), greedy tokens equal
and logprobs within 1e-4, as on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.kernels.paged import PagedKV, make_paged_kv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the GPU path")

CUDA = torch.device("cuda")
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
GREEDY = dict(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3)


def _paged(seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> PagedKV:
    return make_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype=dtype, seed=len(seq_lens))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_kernel_on_cuda(dtype: torch.dtype) -> None:
    from kvloom.kernels.store_kv import store_kv, store_kv_ref

    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, heads, dim, tokens = 64, 16, 8, 128, 300
    # In the cache's dtype, as the model hands them over (the kernel's cast is then exact).
    key = torch.randn(tokens, heads, dim, generator=gen).to(dtype)
    value = torch.randn(tokens, heads, dim, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::7] = -1  # padding rows
    want_k = torch.zeros(num_blocks, block_size, heads, dim, dtype=dtype)
    want_v = torch.zeros_like(want_k)
    store_kv_ref(key, value, want_k, want_v, slots)
    got_k, got_v = want_k.new_zeros(want_k.shape).to(CUDA), want_v.new_zeros(want_v.shape).to(CUDA)
    store_kv(key.to(CUDA), value.to(CUDA), got_k, got_v, slots.to(CUDA))
    assert torch.equal(got_k.cpu(), want_k) and torch.equal(got_v.cpu(), want_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_kernel_on_cuda(dtype: torch.dtype, block_size: int) -> None:
    from kvloom.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref

    seq_lens = [1, 15, 16, 17, 300, 1025, 2048, 0]  # 0: a padded (CUDA-graph) row, written as zeros
    kv = _paged([max(n, 1) for n in seq_lens], block_size, 8, 128, dtype)
    kv.seq_lens[-1] = 0
    q = torch.randn(len(seq_lens), 32, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = 128**-0.5
    want = paged_decode_attention_ref(q.double(), kv.k_cache.double(), kv.v_cache.double(), kv.block_tables,
                                      kv.seq_lens, scale, max(seq_lens))
    got = paged_decode_attention(q.to(CUDA), kv.k_cache.to(CUDA), kv.v_cache.to(CUDA), kv.block_tables.to(CUDA),
                                 kv.seq_lens.to(CUDA), scale, max(seq_lens)).cpu()
    torch.testing.assert_close(got[:-1].double(), want[:-1], atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert torch.count_nonzero(got[-1]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_kernel_on_cuda(dtype: torch.dtype) -> None:
    from kvloom.kernels.paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref

    cases = [(1, 1), (16, 16), (17, 17), (5, 51), (130, 130), (64, 700), (1000, 1000)]  # (query_len, seq_len)
    kv = _paged([s for _, s in cases], 16, 8, 128, dtype)
    starts = [0]
    for query_len, _ in cases:
        starts.append(starts[-1] + query_len)
    q = torch.randn(starts[-1], 32, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    qsl = torch.tensor(starts, dtype=torch.int32)
    seq_lens = [s for _, s in cases]
    max_q = max(n for n, _ in cases)
    scale = 128**-0.5
    want = paged_prefill_attention_ref(q.double(), kv.k_cache.double(), kv.v_cache.double(), kv.block_tables, qsl,
                                       kv.seq_lens, scale, max_q, max(seq_lens), starts, seq_lens)
    got = paged_prefill_attention(q.to(CUDA), kv.k_cache.to(CUDA), kv.v_cache.to(CUDA), kv.block_tables.to(CUDA),
                                  qsl.to(CUDA), kv.seq_lens.to(CUDA), scale, max_q, max(seq_lens), starts,
                                  seq_lens).cpu()
    torch.testing.assert_close(got.double(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def _hf_greedy_cuda(model_dir: Path, prompt: list[int], max_new: int) -> tuple[list[int], torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(CUDA).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=CUDA), attention_mask=torch.ones(1, len(prompt), device=CUDA,
                             dtype=torch.long), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    logits = torch.stack([step[0] for step in out.logits]).float().log_softmax(-1).cpu()
    return out.sequences[0, len(prompt):].tolist(), logits


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_on_cuda_equals_transformers_on_cuda(arch: str, checkpoint_factory: Callable[..., Path]) -> None:
    from kvloom import LLM, SamplingParams

    model_dir = checkpoint_factory(arch=arch)
    prompts = [[(7 * i + 3 * j) % 200 + 3 for j in range(n)] for i, n in enumerate([5, 17, 33, 64, 100, 3])]
    llm = LLM(model_dir, device="cuda", dtype="float32", num_kv_blocks=256, max_num_seqs=8)
    try:
        assert llm.core.cuda_graph_sizes  # captured
        results = llm.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
        llm.core.assert_idle()
    finally:
        llm.close()
    for prompt, result in zip(prompts, results, strict=True):
        tokens, ref = _hf_greedy_cuda(model_dir, prompt, 16)
        assert result.token_ids == tokens
        assert result.logprobs is not None
        for pos, lp in enumerate(result.logprobs):
            ids = [lp.token_id] + [t for t, _ in lp.top]
            torch.testing.assert_close(torch.tensor([lp.logprob] + [v for _, v in lp.top]), ref[pos, ids],
                                       atol=1e-4, rtol=0)


def test_cuda_graphs_give_the_eager_tokens(checkpoint_factory: Callable[..., Path]) -> None:
    from kvloom import LLM, SamplingParams

    model_dir = checkpoint_factory(arch="llama")
    prompts = [[(5 * i + j) % 100 + 3 for j in range(4 + 3 * i)] for i in range(10)]
    params = [SamplingParams(temperature=0.0, max_tokens=2 + 2 * i, ignore_eos=True) for i in range(10)]

    def run(**config: object) -> tuple[list[list[int]], tuple[int, ...]]:
        llm = LLM(model_dir, device="cuda", dtype="float32", block_size=4, num_kv_blocks=48, max_num_seqs=4,
                  enable_prefix_caching=False, **config)
        try:
            tokens = [r.token_ids for r in llm.generate(prompts, params, use_tqdm=False)]
            graphs = llm.core._runner.decode_graphs
            assert graphs is None or graphs.num_replays > 0
            return tokens, llm.core.cuda_graph_sizes
        finally:
            llm.close()

    eager, no_sizes = run(enforce_eager=True)
    graphed, sizes = run()
    assert no_sizes == () and sizes == (1, 2, 4)
    assert graphed == eager


def test_bf16_on_cuda_stays_close_to_float32(checkpoint_factory: Callable[..., Path]) -> None:
    from kvloom import LLM, SamplingParams

    model_dir = checkpoint_factory(arch="llama")
    prompts = [[(11 * i + j) % 150 + 3 for j in range(8 + i)] for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=1)
    first: dict[str, list[int]] = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(model_dir, device="cuda", dtype=dtype, num_kv_blocks=128)
        try:
            first[dtype] = [r.token_ids[0] for r in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.close()
    agree = sum(a == b for a, b in zip(first["float32"], first["bfloat16"], strict=True))
    assert agree >= 6, first  # near-ties may flip in bf16; most first tokens agree


def test_steps_scheduled_ahead_give_the_same_tokens_and_never_wait_for_the_device(
    checkpoint_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On CUDA, ``async_scheduling`` (the default there) equals one step at a time, and launching a
    step (inputs, forward, sampling) makes no call that waits for the device: torch's sync debug
    mode turns any such call into an error in every ``execute`` and ``launch_sample``."""
    from kvloom import LLM, SamplingParams
    from kvloom.runner.model_runner import ModelRunner

    model_dir = checkpoint_factory(arch="llama")
    prompts = [[(3 * i + j) % 180 + 3 for j in range(3 + 5 * i)] for i in range(12)]
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=3 + i, ignore_eos=True,
                             logprobs=2 if i % 3 == 0 else None) for i in range(12)]
    def without_waiting(launch: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            torch.cuda.set_sync_debug_mode("error")
            try:
                return launch(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    def run(async_scheduling: bool) -> list[tuple[list[int], Any]]:
        llm = LLM(model_dir, device="cuda", dtype="float32", block_size=4, num_kv_blocks=96, max_num_seqs=8,
                  async_scheduling=async_scheduling)
        try:
            out = llm.generate(prompts, params, use_tqdm=False)
            assert (llm.core.num_steps_ahead > 0) is async_scheduling
            llm.core.assert_idle()
            return [(r.token_ids, r.logprobs) for r in out]
        finally:
            llm.close()

    one_at_a_time = run(False)
    for name in ("execute", "launch_sample"):
        monkeypatch.setattr(ModelRunner, name, without_waiting(getattr(ModelRunner, name)))
    ahead = run(True)
    # Batches differ by a step between the two (admissions wait for the step in flight), and cuBLAS
    # may pick another kernel for another batch size: tokens equal, logprobs to float32 noise.
    assert [tokens for tokens, _ in ahead] == [tokens for tokens, _ in one_at_a_time]
    for (_, got), (_, want) in zip(ahead, one_at_a_time, strict=True):
        assert (got is None) == (want is None)
        for a, b in zip(got or [], want or [], strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4

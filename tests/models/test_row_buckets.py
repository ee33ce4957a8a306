"""Packed GEMMs run at a bounded set of row counts (oneDNN compiles and keeps a kernel per
row count: with exact counts a server's memory grew by ~0.5 GB and it compiled on the request
path whenever a step had a new size)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kvloom import LLM, SamplingParams
from kvloom.layers.linear import Linear
from kvloom.layers.row_buckets import EXACT_ROWS, buckets_up_to, padded_rows
from kvloom.layers.weight_layout import onednn_packs

needs_onednn = pytest.mark.skipif(not onednn_packs(torch.float32), reason="oneDNN cannot pack float32 weights here")


def test_padded_rows_is_a_small_monotonic_set_with_bounded_padding() -> None:
    buckets = buckets_up_to(2048)
    assert len(buckets) == 72
    assert buckets[:EXACT_ROWS] == list(range(1, EXACT_ROWS + 1))
    previous = 0
    for rows in range(1, 5000):
        padded = padded_rows(rows)
        assert padded >= rows and padded >= previous
        assert padded_rows(padded) == padded
        assert padded == rows if rows <= EXACT_ROWS else padded < rows * 9 / 8
        previous = padded


@needs_onednn
def test_a_packed_linear_gives_the_unpadded_product_at_every_row_count() -> None:
    torch.manual_seed(0)
    layer = Linear(48, 40, bias=True, dtype=torch.float32)
    layer.weight.data.normal_()
    assert layer.bias is not None
    layer.bias.data.normal_()
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.pack_onednn()
    for rows in (1, 15, 16, 17, 19, 33, 100, 257):
        x = torch.randn(rows, 48)
        out = layer(x)
        assert out.shape == (rows, 40) and out.is_contiguous()
        torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_serving_mix_reaches_onednn_at_bucketed_row_counts_only(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: set[int] = set()
    real = torch.ops.mkldnn._linear_pointwise

    def recording(x: torch.Tensor, *args: Any) -> Any:
        seen.add(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", recording)
    llm = LLM(llama_dir, max_model_len=256, cpu_gemm="onednn")
    rng = random.Random(0)
    sizes = set()
    for _ in range(12):  # steps of many different sizes: batches of 1-20 prompts of 1-40 tokens
        prompts = [[rng.randrange(3, 200) for _ in range(rng.randint(1, 40))] for _ in range(rng.randint(1, 20))]
        sizes.add(sum(len(p) for p in prompts))
        llm.generate(prompts, SamplingParams(max_tokens=rng.randint(1, 6), ignore_eos=True))
    assert seen, "no GEMM went through oneDNN"
    assert all(padded_rows(m) == m for m in seen), sorted(seen)
    assert len(sizes) > 8  # the mix had many step sizes; only their buckets reached oneDNN
    llm.assert_idle()


@needs_onednn
def test_after_warmup_no_step_meets_a_new_gemm_shape(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``warmup=True`` runs every (weight shape, row bucket) pair at start: a serving mix afterwards
    never makes oneDNN compile a kernel it has not already built."""
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real = torch.ops.mkldnn._linear_pointwise

    def recording(x: torch.Tensor, weight: torch.Tensor, *args: Any) -> Any:
        seen.append((tuple(x.shape), tuple(weight.shape)))
        return real(x, weight, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", recording)
    llm = LLM(llama_dir, max_model_len=256, cpu_gemm="onednn", warmup=True, max_num_batched_tokens=256,
              max_num_seqs=32)
    warmed = set(seen)
    assert len(warmed) >= len(buckets_up_to(256)), "the warm-up ran too few shapes"
    rng = random.Random(1)
    for _ in range(10):
        prompts = [[rng.randrange(3, 200) for _ in range(rng.randint(1, 40))] for _ in range(rng.randint(1, 20))]
        llm.generate(prompts, SamplingParams(max_tokens=rng.randint(1, 6), ignore_eos=True))
    assert set(seen) <= warmed, sorted(set(seen) - warmed)[:5]
    llm.assert_idle()

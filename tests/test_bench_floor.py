"""The GEMM floor (``kvloom.bench.analysis.floor``) against a hand computation, and the bf16 ceilings that
exist exactly where the CPU has fast bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvloom.bench import machine
from kvloom.bench.analysis.floor import (
    ModelParams,
    Rates,
    floor_result,
    model_params,
    rates_for,
    read_model_params,
    workload_floor,
)
from kvloom.models.dtype_choice import CpuMatmulSupport
from tests.fakes import fake_cpu

STANDARD = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4,
            "num_hidden_layers": 8, "vocab_size": 32000, "tie_word_embeddings": False}
"""The standard benchmark checkpoint's shape (``kvloom.models.checkpoints.STANDARD_MODEL``)."""


def test_params_of_the_standard_checkpoint_by_hand() -> None:
    p = model_params(STANDARD)
    # Per layer: q 1024x1024, k and v 1024x256 (4 KV heads of 64), o 1024x1024, MLP 3 x 1024x2816.
    per_layer = 1_048_576 + 2 * 262_144 + 1_048_576 + 3 * 2_883_584
    assert per_layer == 11_272_192
    assert p.linear == 8 * per_layer == 90_177_536
    assert p.lm_head == p.embedding == 32_768_000
    assert p.total == 90_177_536 + 2 * 32_768_000  # untied: embedding and lm_head are both weights


def test_params_follow_head_dim_kv_heads_tying_and_text_config() -> None:
    qwen3 = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 32, "num_hidden_layers": 2, "vocab_size": 100, "tie_word_embeddings": True}
    p = model_params(qwen3)
    # q, o: 64 x (4 x 32) each; k, v: 64 x (2 x 32) each; MLP 3 x 64 x 128.
    assert p.linear == 2 * (2 * 64 * 128 + 2 * 64 * 64 + 3 * 64 * 128)
    assert p.total == p.linear + 100 * 64  # tied: the lm_head is the embedding
    no_kv = {k: v for k, v in qwen3.items() if k not in ("num_key_value_heads", "head_dim")}
    assert model_params(no_kv).linear == 2 * (4 * 64 * 64 + 3 * 64 * 128)  # MHA, head_dim = hidden / heads
    assert model_params({"architectures": ["X"], "text_config": qwen3}) == p


def test_workload_floor_against_a_hand_computation() -> None:
    params = ModelParams(linear=90_000_000, lm_head=30_000_000, embedding=30_000_000, tie_word_embeddings=False)
    rates = Rates(matmul_gflops=200.0, linear_m64_gflops=150.0, copy_gbps=30.0)
    f = workload_floor(params, rates, prompt_tokens=10_000, num_requests=64, output_len=65, bytes_per_param=4)
    # Prefill: 10,000 tokens x 2 x 90M = 1.8 TFLOP, + 64 lm_head rows x 2 x 30M = 3.84 GFLOP, at 200 GFLOP/s.
    assert f.prefill_s == pytest.approx((1.8e12 + 3.84e9) / 200e9) == pytest.approx(9.0192)
    # A decode step: 64 x 2 x 120M = 15.36 GFLOP at 150 GFLOP/s = 0.1024 s, vs 480 MB at 30 GB/s = 0.016 s.
    assert f.decode_step_s == pytest.approx(0.1024) and f.decode_bound == "compute"
    assert f.decode_s == pytest.approx(64 * 0.1024)
    assert f.total_s == pytest.approx(9.0192 + 6.5536)
    assert f.tokens_per_s == pytest.approx(64 * 65 / 15.5728)
    # One request at a time, bf16 bytes, a slow memory: each step reads 240 MB at 1 GB/s = 0.24 s.
    slow = workload_floor(params, Rates(200.0, 150.0, 1.0), prompt_tokens=100, num_requests=1, output_len=3,
                          bytes_per_param=2)
    assert slow.decode_bound == "memory" and slow.decode_s == pytest.approx(2 * 0.24)


def test_rates_come_from_the_ceilings_of_the_dtype_or_not_at_all() -> None:
    fp32 = {"matmul_2048_gflops": 187.8, "linear_m1_gflops": 30.2, "linear_m64_gflops": 161.9, "copy_gbps": 32.6}
    assert rates_for(fp32, "float32") == Rates(187.8, 161.9, 32.6)
    assert rates_for(fp32, "bfloat16") is None and rates_for(fp32, "float16") is None
    bf16 = fp32 | {"matmul_2048_bf16_gflops": 600.0, "linear_m64_bf16_gflops": 450.0}
    assert rates_for(bf16, "bfloat16") == Rates(600.0, 450.0, 32.6)


def test_floor_result_of_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(STANDARD))
    assert read_model_params(tmp_path) == model_params(STANDARD)
    ceilings = {"matmul_2048_gflops": 187.8, "linear_m64_gflops": 161.9, "copy_gbps": 32.6}
    result = floor_result(tmp_path, ceilings, "float32", prompt_tokens=9801, num_requests=64, output_len=64,
                          wall_s=28.4)
    # By hand: prefill (9801 x 2 x 90,177,536 + 64 x 2 x 32,768,000) / 187.8e9 = 9.4348 s; a decode step
    # 64 x 2 x 122,945,536 / 161.9e9 = 0.097202 s (compute: its 491.8 MB read takes 0.015 s), 63 of them.
    assert result["prefill_s"] == pytest.approx(9.4348, rel=1e-4)
    assert result["decode_step_s"] == pytest.approx(0.097202, rel=1e-4) and result["decode_bound"] == "compute"
    assert result["floor_s"] == pytest.approx(15.5585, rel=1e-4)
    assert result["kvloom_pct_of_floor"] == pytest.approx(100 * result["floor_s"] / 28.4, abs=0.1)
    missing = floor_result(tmp_path, ceilings, "bfloat16", prompt_tokens=1, num_requests=1, output_len=1, wall_s=1)
    assert missing["floor_s"] is None and "no bfloat16 ceilings" in missing["reason"]


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("fast_bf16", [True, False])
def test_bf16_ceilings_are_measured_only_where_the_cpu_has_fast_bf16(
    fast_bf16: bool, onednn: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_cpu(monkeypatch, CpuMatmulSupport(amx=fast_bf16, avx512_bf16=False))
    # Where oneDNN packs (faked both ways for float32; bf16 packing needs CPU features this machine
    # may lack, so it is never faked), each GEMM is timed a second time through it.
    monkeypatch.setattr("kvloom.layers.weight_layout.onednn_packs", lambda dtype: onednn and dtype == torch.float32)
    timed: list[object] = []

    def fake_best_time(fn: object, *, min_time: float, max_reps: int = 1000) -> float:
        timed.append(fn)  # never called: an emulated bf16 2048^3 would take minutes
        return 0.01

    monkeypatch.setattr(machine, "_best_time", fake_best_time)
    ceilings = machine.measure_ceilings(quick=True)
    bf16_keys = {"matmul_2048_bf16_gflops", "linear_m64_bf16_gflops"}
    assert bf16_keys & ceilings.keys() == (bf16_keys if fast_bf16 else set())
    assert {"matmul_2048_gflops", "linear_m1_gflops", "linear_m16_gflops", "linear_m64_gflops",
            "copy_gbps"} <= ceilings.keys()
    assert len(timed) == 4 * (2 if onednn else 1) + (2 if fast_bf16 else 0) + 1  # fp32, bf16 GEMMs, the copy
    assert ceilings.get("matmul_2048_bf16_gflops", 0) == (round(2 * 2048**3 / 0.01 / 1e9, 1) if fast_bf16 else 0)


def test_each_ceiling_is_its_best_over_the_measurements() -> None:
    from kvloom.bench.machine import best_ceilings

    before = {"matmul_2048_gflops": 42.3, "linear_m64_gflops": 67.0, "copy_gbps": 14.6}
    after = {"matmul_2048_gflops": 70.1, "linear_m64_gflops": 46.4, "copy_gbps": 16.3}
    assert best_ceilings(before, after) == {"matmul_2048_gflops": 70.1, "linear_m64_gflops": 67.0, "copy_gbps": 16.3}
    assert best_ceilings(before) == before

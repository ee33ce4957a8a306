"""``kvloom bench serve``: Poisson arrivals replayed against kvloom and transformers' continuous batching."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest

from kvloom.bench.analysis.latency import summarize
from kvloom.bench.peers import RequestTrace
from kvloom.bench.serve import poisson_arrivals
from kvloom.cli import main
from tests.fakes import fake_cpu


def _tiny_model(checkpoint_factory: Callable[..., Path]) -> Path:
    return checkpoint_factory(arch="llama", with_tokenizer=False)


def test_bench_serve_tiny(tmp_path: Path, checkpoint_factory: Callable[..., Path],
                          capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "serve.json"
    argv = ["bench", "serve", "--model", str(_tiny_model(checkpoint_factory)), "--num-requests", "6",
            "--output-len", "4", "--rate", "50", "--peers", "cb512", "--json", str(out_json), "--quick"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "command: python -m kvloom bench serve" in printed and "machine:" in printed
    assert "best-peer p50 TTFT / kvloom p50 TTFT (cb512)" in printed and "TTFT, peers:" in printed

    result = json.loads(out_json.read_text())
    assert {"command", "machine", "workload", "kvloom", "peers", "summary"} <= result.keys()
    assert result["benchmark"] == "serve" and result["machine"]["ceilings"]["matmul_2048_gflops"] > 0
    offsets = result["workload"]["arrival_offsets_s"]
    assert len(offsets) == 6 and offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] > 0
    kv = result["kvloom"]
    assert kv["output_lens_ok"] and kv["engine_stats"]["healthy"] and kv["engine_stats"]["error"] is None
    (peer,) = result["peers"]
    assert peer["name"] == "cb512" and peer["error"] is None, peer["error"]
    for system in (kv, peer):
        assert system["output_tokens_per_s"] > 0 and system["output_tokens"] == 6 * 4
        for metric in ("ttft_s", "tpot_s", "e2e_s"):
            dist = system[metric]
            assert 0 < dist["p50"] <= dist["p99"], (metric, dist)
        assert system["ttft_s"]["mean"] > 0 and system["ttft_measured"]
        assert all(0 < r["ttft_s"] < r["e2e_s"] and r["output_tokens"] == 4 for r in system["requests"])
    assert peer["matches_kvloom"] == 6 and peer["mismatched_requests"] == []  # float32 greedy: same tokens
    assert kv["dtype"] == peer["dtype"] == "float32" and peer["compared_with"] == "kvloom"
    assert result["kvloom_fp32"] is None and "dtype" not in kv["config"]  # kvloom's default config
    summary = result["summary"]
    assert summary["all_tokens_match"] and summary["best_ttft_peer"] == summary["best_throughput_peer"] == "cb512"
    assert summary["ttft_p50_ratio"] > 0 and summary["throughput_ratio"] > 0


def test_bench_serve_reports_a_failing_peer(tmp_path: Path, checkpoint_factory: Callable[..., Path],
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("add_request() got an unexpected keyword argument 'x'")

    monkeypatch.setattr("kvloom.bench.serve.serve_cb", broken)
    out_json = tmp_path / "serve.json"
    argv = ["bench", "serve", "--model", str(_tiny_model(checkpoint_factory)), "--num-requests", "2",
            "--output-len", "2", "--rate", "inf", "--peers", "cb64", "--json", str(out_json), "--quick"]
    assert main(argv) == 0
    assert "unexpected keyword argument" in capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert result["peers"][0]["error"].startswith("TypeError") and result["peers"][0]["output_tokens_per_s"] is None
    assert result["summary"]["best_ttft_peer"] is None and result["kvloom"]["output_tokens_per_s"] > 0
    assert result["workload"]["rate"] is None and result["workload"]["arrival_offsets_s"] == [0.0, 0.0]


def test_bench_serve_on_a_fast_bf16_cpu_checks_float32_with_a_second_kvloom(
    tmp_path: Path, checkpoint_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kvloom.bench import machine
    from kvloom.models.dtype_choice import CpuMatmulSupport

    # An AMX CPU, faked (kvloom's default becomes bf16); ceilings faked: no emulated bf16 2048^3 here.
    fake_cpu(monkeypatch, CpuMatmulSupport(amx=True, avx512_bf16=True))
    monkeypatch.setattr(machine, "measure_ceilings", lambda **kwargs: {"matmul_2048_gflops": 1.0})
    out_json = tmp_path / "serve.json"
    argv = ["bench", "serve", "--model", str(_tiny_model(checkpoint_factory)), "--num-requests", "3",
            "--output-len", "3", "--rate", "inf", "--peers", "cb64,cb64@bf16", "--json", str(out_json), "--quick"]
    assert main(argv) == 0
    assert "kvloom@fp32" in capsys.readouterr().out
    result = json.loads(out_json.read_text())
    kv, kv32 = result["kvloom"], result["kvloom_fp32"]
    assert (kv["name"], kv["dtype"], kv32["name"], kv32["dtype"]) == ("kvloom", "bfloat16", "kvloom@fp32", "float32")
    assert kv32["output_tokens"] == 9 and kv32["output_lens_ok"]
    peers = {p["name"]: p for p in result["peers"]}
    assert (peers["cb64"]["dtype"], peers["cb64"]["compared_with"], peers["cb64"]["matches_kvloom"]) == (
        "float32", "kvloom@fp32", 3)
    assert (peers["cb64@bf16"]["dtype"], peers["cb64@bf16"]["compared_with"]) == ("bfloat16", "kvloom")
    assert result["summary"]["float32_all_match"] is True and result["summary"]["kvloom_dtype"] == "bfloat16"


@pytest.mark.parametrize("bad", [["--rate", "0"], ["--rate", "-1"], ["--rate", "5", "--peers", "static8"],
                                 ["--rate", "5", "--peers", "cb512@fp16"], []])
def test_bench_serve_rejects_bad_arguments(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "serve", "--model", "/nonexistent", *bad]) == 2
    assert "bench serve:" in capsys.readouterr().err


def test_arrivals_are_deterministic_with_the_right_mean_gap() -> None:
    offsets = poisson_arrivals(20_000, rate=4.0, seed=3)
    assert offsets == poisson_arrivals(20_000, rate=4.0, seed=3)
    assert offsets[:50] != poisson_arrivals(50, rate=4.0, seed=4)
    assert poisson_arrivals(50, rate=4.0, seed=3) == offsets[:50]  # a prefix does not depend on the count
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets[0] == 0.0 and min(gaps) >= 0
    # Exponential gaps, mean 1/rate = 0.25 s: the sample mean's std is 0.25/sqrt(20k) ~ 0.7%.
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.05)
    assert poisson_arrivals(5, rate=math.inf, seed=0) == [0.0] * 5
    with pytest.raises(ValueError, match="--rate"):
        poisson_arrivals(5, rate=0.0, seed=0)


def test_bench_serve_and_engine_stats_report_the_same_percentiles() -> None:
    """One definition (``kvloom.engine.percentile``: linear, numpy's default) behind both."""
    from kvloom.engine.stats import StatsCollector, build_stats

    ttfts = [0.5, 0.1, 0.4, 0.2, 0.3, 3.0]
    traces = [RequestTrace(10.0, 10.0, 10.0 + t, 11.0 + t, [1, 2, 3]) for t in ttfts]
    collector = StatsCollector()
    for t in ttfts:
        collector.record_finished(t, 1.0 + t, 3)
    served, stats = summarize(traces), build_stats(None, 0, collector, True, None)
    # Sorted 0.1 ... 0.5, 3.0: p50 at rank 2.5, p99 at rank 4.95 (0.5 + 0.95 x 2.5), not the maximum.
    assert stats.ttft_p50 == pytest.approx(0.35) and stats.ttft_p99 == pytest.approx(2.875)
    assert served["ttft_s"]["p50"] == round(stats.ttft_p50, 4) and served["ttft_s"]["p99"] == round(stats.ttft_p99, 4)
    assert stats.tpot_p99 is not None and served["tpot_s"]["p99"] == round(stats.tpot_p99, 4) == 0.5

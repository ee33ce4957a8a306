"""``kvloom bench prefix``: shared-prefix workloads, prefix caching off / auto / handles, on a tiny checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from kvloom.bench.prefix import build_workload
from kvloom.cli import main


def _run(tmp_path: Path, checkpoint_factory: Callable[..., Path], peers: str) -> dict[str, object]:
    model = checkpoint_factory(arch="llama", with_tokenizer=False, max_position_embeddings=1024)
    out_json = tmp_path / "prefix.json"
    argv = ["bench", "prefix", "--model", str(model), "--scale", "0.05", "--output-len", "2", "--peers", peers,
            "--json", str(out_json), "--quick"]
    assert main(argv) == 0
    result: dict[str, object] = json.loads(out_json.read_text())
    return result


def test_bench_prefix_tiny(tmp_path: Path, checkpoint_factory: Callable[..., Path],
                           capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(tmp_path, checkpoint_factory, "")
    printed = capsys.readouterr().out
    assert "command: python -m kvloom bench prefix" in printed and "machine:" in printed
    assert "TTFT p50 off / handles on agent:" in printed and "(target >= 5x)" in printed
    assert {"command", "machine", "model", "workloads", "systems", "summary"} <= result.keys()
    workloads, systems, summary = result["workloads"], result["systems"], result["summary"]
    assert isinstance(workloads, dict) and isinstance(systems, dict) and isinstance(summary, dict)
    assert set(workloads) == set(systems) == {"agent", "rag"}
    for name, entries in systems.items():
        wl = workloads[name]
        assert [s["name"] for s in entries] == ["off", "auto", "handles"]
        for s in entries:
            assert s["output_tokens_per_s"] > 0 and s["duration_s"] > 0 and s["output_tokens"] == 2 * wl["num_requests"]
            assert 0 < s["ttft_s"]["p50"] <= s["ttft_s"]["p99"]
            assert s["matches_off"] == wl["num_requests"] and s["mismatched_requests"] == []
        off, _, handles = entries
        assert off["mean_cached_tokens"] == 0 and off["setup_s"] is None
        whole_blocks = wl["prefix_len"] // handles["block_size"] * handles["block_size"]
        assert whole_blocks > 0 and handles["setup_s"] > 0
        assert handles["mean_cached_tokens"] == whole_blocks and set(handles["cached_tokens"]) == {whole_blocks}
    assert summary["all_kvloom_tokens_match_off"] and summary["ttft_p50_off_over_handles"]["agent"] > 0


def test_bench_prefix_with_a_peer(tmp_path: Path, checkpoint_factory: Callable[..., Path]) -> None:
    result = _run(tmp_path, checkpoint_factory, "cb512")
    systems = result["systems"]
    assert isinstance(systems, dict)
    for entries in systems.values():
        peer = entries[-1]
        assert peer["name"] == "cb512" and peer["error"] is None, peer["error"]
        assert peer["output_tokens_per_s"] > 0 and peer["matches_off"] == len(peer["requests"])


def test_workload_shapes_scale_and_are_deterministic() -> None:
    agent = build_workload("agent", 1.0, 1000, seed=0)
    assert len(agent.prefixes) == 1 and len(agent.prefixes[0]) == 2000 and len(agent.suffixes) == 64
    assert all(len(p) == 2050 and max(p) < 1000 for p in agent.prompts)
    rag = build_workload("rag", 1.0, 1000, seed=0)
    assert len(rag.prefixes) == 8 and {len(p) for p in rag.prefixes} == {1000} and len(rag.suffixes) == 64
    assert sorted(rag.owner) == [k for k in range(8) for _ in range(8)] and {len(s) for s in rag.suffixes} == {30}
    assert build_workload("rag", 1.0, 1000, seed=0) == rag and build_workload("rag", 1.0, 1000, seed=1) != rag
    tiny = build_workload("rag", 0.01, 1000, seed=0)
    assert len(tiny.prefixes) == 1 and len(tiny.prefixes[0]) == 10 and len(tiny.suffixes) == 1


@pytest.mark.parametrize("bad", [["--workload", "chat"], ["--scale", "0"], ["--peers", "static8"]])
def test_bench_prefix_rejects_bad_arguments(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "prefix", "--model", "/nonexistent", *bad]) == 2
    assert "bench prefix:" in capsys.readouterr().err

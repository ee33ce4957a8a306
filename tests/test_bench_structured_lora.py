"""``kvloom bench structured`` and ``kvloom bench lora`` end to end on tiny checkpoints (shape of the
output, not speed: speed targets live in docs/benchmarks.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from kvloom.cli import main


def test_bench_structured_tiny(tmp_path: Path, llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "structured.json"
    argv = ["bench", "structured", "--model", str(llama_dir), "--num-requests", "6", "--concurrency", "3",
            "--output-len", "48", "--repeats", "2", "--json", str(out_json), "--quick"]
    assert main(argv) == 0  # non-zero if any completed output failed to validate
    printed = capsys.readouterr().out
    assert "kvloom xgrammar / unconstrained (same prompts, same lengths):" in printed
    assert "kvloom outlines / unconstrained (same prompts, same lengths):" in printed
    result = json.loads(out_json.read_text())
    rows = result["results"]
    assert set(rows) == {"xgrammar", "outlines"}
    for backend in ("xgrammar", "outlines"):
        row = rows[backend]
        assert row["valid"] == row["completed"] and row["ratio"] > 0 and row["mask_ms_per_step"] > 0
        # The baseline generated exactly the constrained run's tokens, request by request.
        assert row["unconstrained"]["output_tokens"] == row["output_tokens"] <= 6 * 48
        assert row["unconstrained"]["mask_ms_per_step"] is None
        assert len(row["tokens_per_s_runs"]) == len(row["unconstrained"]["tokens_per_s_runs"]) == 2


def test_bench_lora_tiny(tmp_path: Path, checkpoint_factory: Callable[..., Path],
                         capsys: pytest.CaptureFixture[str]) -> None:
    model = checkpoint_factory(arch="llama", with_tokenizer=False)
    out_json = tmp_path / "lora.json"
    argv = ["bench", "lora", "--model", str(model), "--adapters", "0,1,3", "--rank", "4", "--num-requests", "6",
            "--output-len", "4", "--repeats", "2", "--json", str(out_json), "--quick"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 adapters:" in printed and "vs base" in printed
    rows = json.loads(out_json.read_text())["results"]
    assert [r["adapters"] for r in rows] == [0, 1, 3]
    assert rows[0]["ratio"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)
    assert all(len(r["walls_s"]) == 2 for r in rows)  # the engines took turns, two rounds
    assert all(r["outputs_differ_from_base"] >= 1 for r in rows[1:])  # the adapters change what the model says

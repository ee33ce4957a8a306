"""``kvloom bench serve --sweep``: a ladder of rates, goodput per system, plots next to the JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kvloom.bench.analysis.plots import write_sweep_plots
from kvloom.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_serve_sweep_tiny(tmp_path: Path, checkpoint_factory: Callable[..., Path],
                                capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = checkpoint_factory(arch="llama", with_tokenizer=False)
    out_json = tmp_path / "sweep.json"
    argv = ["bench", "serve", "--model", str(model_dir), "--num-requests", "4", "--output-len", "3",
            "--sweep", "inf,20", "--peers", "cb64", "--slo-ttft", "30", "--slo-tpot", "5", "--json", str(out_json),
            "--quick"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "kvloom / best peer goodput (cb64): - (both meet the SLO even with every request at once)" in printed
    assert "plots: " in printed and "SLO met" in printed

    result = json.loads(out_json.read_text())
    assert result["benchmark"] == "serve" and result["mode"] == "sweep"
    assert result["sweep"]["ladder"] == [20.0, "inf"]  # ascending, inf last, JSON-safe
    assert result["sweep"]["requests_per_rate"] == [4, 4]
    assert result["slo"] == {"ttft_s": 30.0, "tpot_s": 5.0, "attainment": 0.9}
    kv, peer = result["systems"]
    assert (kv["name"], kv["dtype"]) == ("kvloom", "float32") and (peer["name"], peer["dtype"]) == ("cb64", "float32")
    for system in (kv, peer):
        assert [p["rate"] for p in system["points"]] == [20.0, "inf"]
        for point in system["points"]:
            assert point["error"] is None and point["num_requests"] == 4 and point["attainment"] == 1.0
            for metric in ("ttft_s", "tpot_s"):
                assert 0 < point[metric]["p50"] <= point[metric]["p90"] <= point[metric]["p99"]
            assert point["output_tokens_per_s"] > 0
        assert system["goodput"] == {"rate": "inf", "lower_bound": False, "stopped_after": None, "misses_below": []}
    assert all(p["output_lens_ok"] for p in kv["points"])
    assert [p["matches_kvloom"] for p in peer["points"]] == [4, 4] and peer["compared_with"] == "kvloom"
    assert result["summary"]["best_peer"] == "cb64" and result["summary"]["float32_all_match"] is True

    plots = [tmp_path / "sweep-ttft.png", tmp_path / "sweep-tpot.png"]
    assert result["plots"] == [str(p) for p in plots]
    for plot in plots:
        data = plot.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_a_system_missing_the_slo_twice_stops_climbing(tmp_path: Path, checkpoint_factory: Callable[..., Path],
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from kvloom.bench import machine

    monkeypatch.setattr(machine, "measure_ceilings", lambda **kwargs: {"matmul_2048_gflops": 1.0})  # not the point
    model_dir = checkpoint_factory(arch="llama", with_tokenizer=False)
    out_json = tmp_path / "sweep.json"
    # A TTFT SLO no real system meets: kvloom misses at 10 and 20 req/s and never tries inf.
    argv = ["bench", "serve", "--model", str(model_dir), "--num-requests", "2", "--output-len", "2",
            "--sweep", "10,20,inf", "--peers", "", "--slo-ttft", "1e-9", "--json", str(out_json), "--quick"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "kvloom stops climbing after 20 req/s: below the target at 2 rates in a row" in err
    assert "kvloom / best peer goodput: no peer ran" in out
    (kv,) = json.loads(out_json.read_text())["systems"]
    assert [p["rate"] for p in kv["points"]] == [10.0, 20.0] and [p["attainment"] for p in kv["points"]] == [0, 0]
    assert kv["goodput"] == {"rate": 0.0, "lower_bound": False, "stopped_after": 20.0, "misses_below": []}


@pytest.mark.parametrize(("bad", "says"), [
    (["--sweep", "1,2", "--rate", "3"], "--sweep and --rate"),
    (["--sweep", "1,fast"], "--sweep: 'fast' is not a rate"),
    (["--sweep", "0,1"], "--sweep: rates must be > 0"),
    (["--sweep", "-1"], "--sweep: rates must be > 0"),
    (["--sweep", "--slo-attainment", "1.5"], "--slo-attainment"),
    (["--sweep", "--slo-tpot", "0"], "--slo-tpot"),
    (["--sweep", "--sweep-duration", "0"], "--sweep-duration"),
    (["--sweep", "--peers", "static8"], "--peers static8"),
    (["--sweep", "--peers", "cb512@fp16"], "--peers: 'cb512@fp16'"),
    ([], "give --rate R (one rate) or --sweep"),
])
def test_sweep_flags_are_checked_before_anything_runs(bad: list[str], says: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "serve", "--model", "/nonexistent", *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench serve: ") and says in err, err


def _sweep_result() -> dict[str, object]:
    def point(rate: float | str, ttft: float, tpot: float) -> dict[str, object]:
        return {"rate": rate, "error": None, "ttft_s": {"p50": ttft, "p90": 2 * ttft, "p99": 3 * ttft},
                "tpot_s": {"p50": tpot, "p90": 2 * tpot, "p99": 3 * tpot}}

    return {
        "sweep": {"ladder": [0.5, 1.0, 2.0, "inf"]}, "slo": {"ttft_s": 2.0, "tpot_s": 0.2, "attainment": 0.9},
        "systems": [
            {"name": "kvloom", "points": [point(0.5, 0.2, 0.05), point(1.0, 0.3, 0.06), point(2.0, 0.5, 0.08),
                                          point("inf", 6.0, 0.3)]},
            {"name": "cb512", "points": [point(0.5, 0.4, 0.1), point(1.0, 3.0, 0.4),
                                         {"rate": 2.0, "error": "RuntimeError: x", "ttft_s": None, "tpot_s": None}]},
        ],
    }


def test_plots_are_pngs_next_to_the_json(tmp_path: Path) -> None:
    written, skipped = write_sweep_plots(_sweep_result(), tmp_path / "out" / "run.json")
    assert skipped is None and written == [tmp_path / "out" / "run-ttft.png", tmp_path / "out" / "run-tpot.png"]
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in written)


def test_without_matplotlib_the_plots_are_skipped_with_the_reason(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    written, skipped = write_sweep_plots(_sweep_result(), tmp_path / "run.json")
    assert written == [] and skipped is not None and "matplotlib" in skipped and "kvloom[bench]" in skipped
    assert list(tmp_path.iterdir()) == []

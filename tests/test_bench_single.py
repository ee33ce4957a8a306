"""``kvloom bench single``: bad flags are refused before anything runs; the weight-bytes arithmetic by hand;
one tiny end-to-end run of the four kvloom systems at 1 and 3 streams (float and int8 agree with each other
on a random checkpoint's greedy tokens only where they do, so only the float pair is held to equality), and
a llama.cpp system named without its file is refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from kvloom.bench.analysis.roofline import DecodeShape
from kvloom.bench.single import weight_bytes
from kvloom.cli import main

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 100, "tie_word_embeddings": False}


def test_weight_bytes_by_hand() -> None:
    shape = DecodeShape.from_config(SMALL)
    assert weight_bytes(shape, SMALL, "float32", False) == 4 * 80_128
    assert weight_bytes(shape, SMALL, "bfloat16", False) == 2 * 80_128
    # int8: one byte a weight plus a float32 scale per output channel: per layer q 64 + k 32 + v 32 + o 64,
    # gate and up 2 x 128, down 64; the head 100.
    assert weight_bytes(shape, SMALL, "float32", True) == 80_128 + 4 * (2 * (64 + 32 + 32 + 64 + 256 + 64) + 100)


@pytest.mark.parametrize("bad", [["--streams", "0"], ["--systems", "generate,generate"], ["--systems", "beam"],
                                 ["--systems", "llamacpp-Q8_0"], ["--llama-server", "Q8_0=localhost:8081"],
                                 ["--output-len", "1"]])
def test_bad_flags_are_refused(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "single", "--model", "/nonexistent", *bad]) == 2
    assert capsys.readouterr().err.startswith("bench single: ")


def test_bench_single_tiny(tmp_path: Path, checkpoint_factory: Callable[..., Path],
                           capsys: pytest.CaptureFixture[str]) -> None:
    model = checkpoint_factory(arch="llama", hidden_size=64)
    out_json = tmp_path / "single.json"
    systems = "generate,stream,generate-int8,stream-int8,generate-int8-kv,transformers,transformers-int8"
    # A llama-server that is not running: reported in the results, the rest still measured.
    assert main(["bench", "single", "--model", str(model), "--systems", systems + ",llamacpp-Q8_0",
                 "--llama-server", "Q8_0=http://127.0.0.1:9", "--streams", "1,3", "--rounds", "1",
                 "--prompt-len", "12", "--output-len", "5", "--dtype", "float32", "--json", str(out_json),
                 "--quick"]) == 0
    result = json.loads(out_json.read_text())
    assert result["benchmark"] == "single" and result["workload"]["streams"] == [1, 3]
    assert result["kvloom"]["generate-int8"]["weights"] == "int8"
    assert result["kvloom"]["stream"]["weights"] != "int8"
    assert "transformers" not in result["kvloom"]  # a peer: its figures are in the results only
    for at in result["results"]:
        by_name = {e["name"]: e for e in at["systems"]}
        assert list(by_name) == [*systems.split(","), "llamacpp-Q8_0"]
        assert "URLError" in by_name.pop("llamacpp-Q8_0")["error"]
        for entry in by_name.values():
            assert entry["error"] is None and entry["decode_tokens_per_s"] > 0 and entry["prefill_tokens_per_s"] > 0
        assert by_name["stream"]["tokens_equal_to_first_system"] == 1.0  # stream and generate: the same tokens
        assert by_name["transformers"]["tokens_equal_to_first_system"] == 1.0  # float32: transformers' tokens too
    assert "decode tok/s" in capsys.readouterr().out

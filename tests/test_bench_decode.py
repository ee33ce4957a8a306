"""``kvloom bench decode``: the roofline arithmetic by hand, the decode-throughput formula on
synthetic timestamps, the 1.1B spec without building it, and one tiny end-to-end run on CPU."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvloom.bench import machine
from kvloom.bench.analysis.floor import model_params
from kvloom.bench.analysis.roofline import DecodeShape, decode_tokens_per_s, mean_decode_context, roofline
from kvloom.bench.decode import Pass, parse_concurrency, peer_spec, system_entry
from kvloom.cli import main
from kvloom.models.checkpoints import DECODE_MODEL_1B, STANDARD_MODEL, builder_kwargs, spec_config
from kvloom.models.tiny import build_checkpoint

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 100, "tie_word_embeddings": False}


def test_roofline_of_a_small_config_by_hand() -> None:
    shape = DecodeShape.from_config(SMALL)
    # Per layer: q and o 64 x (4 x 16) each, k and v 64 x (2 x 16) each, MLP 3 x 64 x 128; plus lm_head 100 x 64.
    assert shape.weight_params == 2 * (2 * 4096 + 2 * 2048 + 3 * 8192) + 6400 == 80_128
    assert shape.kv_values_per_token == 2 * 2 * 2 * 16 == 128  # layers x (K, V) x kv heads x head_dim
    r = roofline(shape, "float32", 1.0, concurrency=4, prompt_len=10, output_len=5)
    # Mean context 10 + 5/2 = 12.5; weights 80,128 x 4 B; KV 4 x 12.5 x 128 x 4 B = 25,600 B.
    assert (r.context, r.weight_bytes, r.kv_bytes, r.step_bytes) == (12.5, 320_512, 25_600, 346_112)
    assert r.step_s == pytest.approx(346_112e-9)  # at 1 GB/s
    assert r.tokens_per_s == pytest.approx(4 / 346_112e-9) == pytest.approx(11_556.953, abs=1e-3)
    half = roofline(shape, "bfloat16", 1.0, concurrency=4, prompt_len=10, output_len=5)
    assert half.step_bytes == 173_056 and half.tokens_per_s == pytest.approx(2 * r.tokens_per_s)
    assert r.as_dict()["decode_tokens_per_s"] == 11_556.95 and r.as_dict()["step_bytes"] == 346_112


def test_roofline_of_the_standard_model_at_64_in_bf16() -> None:
    shape = DecodeShape.from_config(spec_config(STANDARD_MODEL))
    assert shape.weight_params == 90_177_536 + 32_768_000 and shape.kv_values_per_token == 8 * 2 * 4 * 64
    r = roofline(shape, "bfloat16", 4000.0, concurrency=64, prompt_len=128, output_len=128)
    # 245,891,072 B of weights + 64 x 192 x 4096 x 2 B = 100,663,296 B of KV, at 4 TB/s: 86.64 us a step.
    assert r.step_bytes == 245_891_072 + 100_663_296
    assert r.step_s == pytest.approx(346_554_368 / 4e12)
    assert r.tokens_per_s == pytest.approx(64 * 4e12 / 346_554_368) == pytest.approx(738_701, rel=1e-5)


@pytest.mark.parametrize(("prompt_len", "output_len"), [(10, 2), (128, 128), (7, 33)])
def test_mean_context_is_the_mean_over_the_decode_steps(prompt_len: int, output_len: int) -> None:
    # Decode step j (1 .. L-1) attends the prompt and j output tokens.
    steps = [prompt_len + j for j in range(1, output_len)]
    assert mean_decode_context(prompt_len, output_len) == pytest.approx(sum(steps) / len(steps))


def test_decode_throughput_formula_on_synthetic_timestamps() -> None:
    assert decode_tokens_per_s(4, 5, end_s=3.0, all_first_s=1.0) == 8.0  # 4 x 4 tokens in 2 s
    assert decode_tokens_per_s(4, 5, end_s=1.0, all_first_s=1.0) is None
    runs = [Pass(wall_s=3.2, first_s=[0.5, 1.0], end_s=3.0, token_ids=[[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]),
            Pass(wall_s=2.2, first_s=[0.4, 0.6], end_s=2.1, token_ids=[[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]])]
    spec = peer_spec("static", 2, "float32", 2048)
    entry = system_entry("static", spec, runs, None, 2, 5, reference=[[1, 2, 3, 4, 5], [6, 7, 8, 9, 9]])
    # Pass 1: 2 x 4 / (3.0 - 1.0) = 4; pass 2: 8 / 1.5 = 5.333: the median of two is their mean.
    assert [r["decode_tokens_per_s"] for r in entry["runs"]] == [4.0, 5.33]
    assert entry["decode_tokens_per_s"] == round((4.0 + 8 / 1.5) / 2, 2)
    assert entry["output_tokens_per_s"] == round((10 / 3.2 + 10 / 2.2) / 2, 2)
    assert entry["all_first_token_s"] == 0.8 and entry["first_token_min_s"] == 0.45
    assert entry["matches_kvloom"] == 1 and entry["mismatched_requests"] == [1] and entry["output_lens_ok"]
    assert entry["config"] == "static2" and entry["error"] is None
    failed = system_entry("cb", None, [], "RuntimeError: no", 2, 5, None)
    assert failed["decode_tokens_per_s"] is None and failed["error"] == "RuntimeError: no"


def test_peer_configurations_follow_the_concurrency() -> None:
    static = peer_spec("static", 64, "bfloat16", 2048)  # every peer runs in kvloom's dtype: names carry none
    assert (static.name, static.batch_size, static.dtype) == ("static64", 64, "bfloat16")
    assert peer_spec("cb", 256, "float32", 2048).max_batch_tokens == 2048
    assert peer_spec("cb", 256, "float32", 128).name == "cb256"  # a decode step holds every request
    explicit = peer_spec("cb4096r64", 8, "bfloat16", 2048)
    assert (explicit.name, explicit.max_batch_tokens, explicit.max_requests_per_batch, explicit.dtype) == (
        "cb4096r64", 4096, 64, "bfloat16")  # the spec's name stays the one given; its dtype is kvloom's
    assert parse_concurrency("64,1,8,8") == [1, 8, 64]


def test_the_1b_spec_is_tinyllama_shaped_without_building_it() -> None:
    config = spec_config(DECODE_MODEL_1B)
    assert config == {"vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "intermediate_size": 5632, "max_position_embeddings": 2048,
                      "tie_word_embeddings": False}
    p = model_params(config)
    # Per layer: q, o 2048 x 2048; k, v 2048 x 256; MLP 3 x 2048 x 5632 = 44,040,192; embedding and lm_head 65.5M each.
    assert p.linear == 22 * 44_040_192 and p.total == 1_099_956_224
    # The builder takes every kwarg; the dtype (a name, so the cache key is JSON) becomes torch's.
    assert set(DECODE_MODEL_1B.build_kwargs) <= set(inspect.signature(build_checkpoint).parameters)
    assert builder_kwargs(DECODE_MODEL_1B.build_kwargs)["dtype"] is torch.bfloat16
    assert builder_kwargs(STANDARD_MODEL.build_kwargs) == STANDARD_MODEL.build_kwargs
    assert DECODE_MODEL_1B.cache_key.startswith("bench-llama-1.1b-v1-")


def test_a_small_bf16_spec_is_saved_in_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvloom.models.checkpoints import ModelSpec, cached_checkpoint

    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(tmp_path))
    spec = ModelSpec("tiny-bf16", "v1", dict(with_tokenizer=False, dtype="bfloat16"))
    model_dir, built = cached_checkpoint(spec, log=False)
    assert built and json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"


def test_device_bandwidth_on_cpu() -> None:
    assert machine.measure_device_bandwidth("cpu", size_bytes=2**20, repeats=2) > 0


@pytest.mark.parametrize(("bad", "says"), [
    (["--concurrency", "0"], "--concurrency"), (["--concurrency", "x"], "--concurrency"),
    (["--concurrency", "1,,2"], "--concurrency"), (["--peers", "static8"], "--peers"),
    (["--peers", "cb@bf16"], "--peers"), (["--peers", "cb512@bf16"], "--peers"), (["--peers", "cb,cb"], "--peers"),
    (["--output-len", "1"], "--output-len"), (["--repeats", "0"], "--repeats"),
    (["--kvloom-config", "block_size"], "--kvloom-config"),
])
def test_bad_arguments_exit_2_naming_the_flag(bad: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "decode", "--model", "/nonexistent", *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bench decode: {says}") or f"{says} " in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists here")
def test_cuda_without_a_gpu_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "decode", "--model", "/nonexistent", "--device", "cuda"]) == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err


def test_bench_decode_tiny(tmp_path: Path, checkpoint_factory: Callable[..., Path],
                           capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = checkpoint_factory(arch="llama", with_tokenizer=False)
    out_json = tmp_path / "decode.json"
    argv = ["bench", "decode", "--model", str(model_dir), "--concurrency", "1,2", "--prompt-len", "8",
            "--output-len", "4", "--peers", "static,cb", "--json", str(out_json), "--quick"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "command: python -m kvloom bench decode" in printed and "machine:" in printed
    assert "concurrency 2: roofline " in printed and "kvloom / best transformers (" in printed
    assert "same greedy tokens as kvloom, float32, all concurrencies: static 3/3, cb 3/3" in printed
    assert "decode graphs: none sizes captured; scheduling ahead: off" in printed  # CPU defaults

    result = json.loads(out_json.read_text())
    assert result["benchmark"] == "decode" and result["schema_version"] == 1
    assert result["machine"]["bandwidth"]["gbps"] == result["machine"]["ceilings"]["copy_gbps"] > 0
    kv = result["kvloom"]
    assert kv["device"] == "cpu" and kv["dtype"] == "float32" and kv["startup_s"] > 0
    assert kv["captured_graph_sizes"] == [] and kv["async_scheduling"] is False
    assert kv["config"]["max_num_seqs"] >= 2 and kv["config"]["num_kv_blocks"] >= 2
    assert [r["concurrency"] for r in result["results"]] == [1, 2]
    for r in result["results"]:
        c = r["concurrency"]
        systems = {s["name"]: s for s in r["systems"]}
        assert systems.keys() == {"kvloom", "static", "cb"}
        for s in systems.values():
            assert s["error"] is None, s["error"]
            assert s["decode_tokens_per_s"] > 0 and s["output_tokens_per_s"] > 0 and s["output_lens_ok"]
            assert 0 < s["first_token_min_s"] <= s["all_first_token_s"] < s["wall_s"] + 1e-3
        assert systems["static"]["matches_kvloom"] == systems["cb"]["matches_kvloom"] == c  # float32: all agree
        assert systems["static"]["config"] == f"static{c}" and systems["cb"]["config"].startswith("cb")
        assert systems["kvloom"]["pct_of_roofline"] > 0 and r["roofline"]["decode_tokens_per_s"] > 0
        assert systems["kvloom"]["pct_of_roofline"] == pytest.approx(
            100 * systems["kvloom"]["decode_tokens_per_s"] / r["roofline"]["decode_tokens_per_s"], rel=0.01)
    summary = result["summary"]
    assert summary["float32_all_match"] is True and summary["agreement"]["peers"] == {"static": 3, "cb": 3}
    assert all(row["ratio_to_best_peer"] > 0 and row["ratio_to_best_cb"] > 0 for row in summary["by_concurrency"])
    assert summary["startup_target_met"] is None  # CPU: the 30 s target is a GPU one
    assert summary["targets"]["pct_of_roofline"]["kvloom"] is None  # concurrency 64 did not run


def test_bench_decode_reports_a_failing_peer(tmp_path: Path, checkpoint_factory: Callable[..., Path],
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("flash attention is not installed")

    monkeypatch.setattr("kvloom.bench.decode.serve_cb", broken)
    out_json = tmp_path / "decode.json"
    argv = ["bench", "decode", "--model", str(checkpoint_factory(arch="llama", with_tokenizer=False)),
            "--concurrency", "2", "--prompt-len", "4", "--output-len", "3", "--peers", "cb",
            "--json", str(out_json), "--quick"]
    assert main(argv) == 0
    assert "flash attention is not installed" in capsys.readouterr().out
    (r,) = json.loads(out_json.read_text())["results"]
    kv, cb = r["systems"]
    assert kv["decode_tokens_per_s"] > 0 and cb["error"].startswith("warm-up: RuntimeError")

"""The command line: ``kvloom demo`` (build once, then reuse) and ``kvloom bench throughput``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kvloom.bench import workload
from kvloom.bench.peers import parse_peers
from kvloom.cli import main
from kvloom.demo import TINY_DEMO_MODEL
from kvloom.models import checkpoints
from tests.fakes import fake_cpu


def test_demo_builds_once_then_reuses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {**os.environ, "KVLOOM_CACHE_DIR": str(tmp_path)}
    first = subprocess.run(
        [sys.executable, "-m", "kvloom", "demo", "--tiny", "--num-prompts", "3", "--max-tokens", "6"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert first.returncode == 0, first.stderr
    assert "RANDOM WEIGHTS" in first.stdout and "run without --tiny" in first.stdout
    assert "built demo checkpoint" in first.stdout
    assert first.stdout.count("assistant (") == 3
    assert "3 prompts in one batch" in first.stdout and "tokens/s" in first.stdout
    model_dir = tmp_path / "models" / TINY_DEMO_MODEL.cache_key
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [model_dir.name]  # no temp dir left behind
    stamp = (model_dir.stat().st_ino, (model_dir / "model.safetensors").stat().st_mtime_ns)

    # Second run, in-process (same code path, no interpreter start-up): must not rebuild.
    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(tmp_path))
    assert main(["demo", "--tiny", "--num-prompts", "2", "--max-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "built demo checkpoint" not in out and "using cached checkpoint" in err
    assert out.count("assistant (") == 2 and "tokens/s" in out
    assert (model_dir.stat().st_ino, (model_dir / "model.safetensors").stat().st_mtime_ns) == stamp


def test_demo_answers_on_the_shipped_model(tmp_path: Path) -> None:
    """``kvloom demo`` with no arguments: the trained demo model, no cache and no download, answers a
    passage's questions, calls a tool and answers from its result, and extracts JSON."""
    env = {**os.environ, "KVLOOM_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "kvloom", "demo"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "trained on a synthetic corpus" in out and "RANDOM" not in out
    answers = re.findall(r"^   A: (.*)$", out, re.M)
    assert len(answers) == 5, out
    expected = ("Dorvan", "Kestrel", "120", "1987", "Pip")
    assert sum(span in answer for span, answer in zip(expected, answers, strict=True)) >= 4, answers
    assert re.search(r'^   assistant calls: weather_report\(\{"city": "Marlow"\}\)$', out, re.M), out
    assert re.search(r"^   assistant: .*sunny.*Marlow|Marlow.*sunny", out, re.M), out
    plain, constrained = re.findall(r"^   assistant(?:, with the schema as a grammar)?: (\{.*)$", out, re.M)
    record = json.loads(plain)
    assert json.loads(constrained) == record and list(record) == ["customer", "item", "quantity"], out
    assert (record["customer"], record["quantity"]) == ("Fenwick", 7), record  # the item: see docs/demo-model.md
    assert not (tmp_path / "models").exists()  # no checkpoint was built into the cache (only the C kernels)


def test_interrupted_build_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(tmp_path))

    def crash(out_dir: Path, **kwargs: object) -> Path:
        (Path(out_dir) / "config.json").write_text("{}")  # half-written, then the build dies
        raise KeyboardInterrupt

    monkeypatch.setattr("kvloom.models.tiny.build_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.cached_checkpoint(TINY_DEMO_MODEL, log=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_workload_is_deterministic_and_in_range() -> None:
    w = workload.Workload(num_requests=50, min_prompt_len=3, max_prompt_len=9, seed=7)
    prompts = w.prompts(vocab_size=100)
    assert prompts == w.prompts(vocab_size=100)
    assert len(prompts) == 50 and all(3 <= len(p) <= 9 and all(0 <= t < 100 for t in p) for p in prompts)
    assert prompts != workload.Workload(num_requests=50, min_prompt_len=3, max_prompt_len=9, seed=8).prompts(100)
    assert checkpoints.STANDARD_MODEL.cache_key != TINY_DEMO_MODEL.cache_key


def test_parse_peers() -> None:
    specs = parse_peers("static8, cb512,cb2048r32")
    assert [(s.kind, s.batch_size, s.max_batch_tokens, s.max_requests_per_batch) for s in specs] == [
        ("static", 8, 0, None), ("cb", 0, 512, None), ("cb", 0, 2048, 32)]
    assert parse_peers("") == []
    for bad in ("static0", "cb", "dynamic8"):
        with pytest.raises(ValueError, match="--peers"):
            parse_peers(bad)


def test_bench_throughput_tiny(
    tmp_path: Path, checkpoint_factory: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = checkpoint_factory(arch="llama", with_tokenizer=False)
    out_json = tmp_path / "bench.json"
    argv = ["bench", "throughput", "--model", str(model_dir), "--num-requests", "4", "--output-len", "4",
            "--peers", "static8,cb512", "--json", str(out_json), "--quick", "--int8",
            "--kvloom-config", "block_size=8", "async_scheduling=true"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "command: python -m kvloom bench throughput" in printed and "machine:" in printed
    assert "kvloom (fp32) / best transformers (" in printed and "; kvloom at " in printed
    assert "scheduling ahead: on)" in printed and "ceilings, best of before and after the runs: matmul_2048" in printed
    assert "kvloom@int8 / kvloom (fp32): " in printed

    result = json.loads(out_json.read_text())
    assert {"command", "machine", "workload", "kvloom", "peers", "floor", "summary"} <= result.keys()
    assert result["machine"]["ceilings"]["matmul_2048_gflops"] > 0
    kv = result["kvloom"]
    assert kv["config"]["block_size"] == 8 and "dtype" not in kv["config"]  # kvloom's default: dtype="auto"
    assert kv["async_scheduling"] is True  # asked for: its tokens too must equal transformers' below
    assert kv["dtype"] == "float32" and "no AMX or AVX512-BF16" in kv["dtype_reason"]  # conftest's CPU
    assert kv["tokens_per_s"] > 0 and kv["output_lens_ok"]
    assert kv["kv_cache"]["peak_waste"] >= 1.0
    assert result["kvloom_fp32"] is None  # kvloom already runs in float32: no second system
    int8 = result["kvloom_int8"]  # --int8: its own system, taking turns, compared with nothing
    assert int8["name"] == "kvloom@int8" and int8["config"]["quantization"] == "int8" and int8["tokens_per_s"] > 0
    assert result["summary"]["int8_ratio_to_kvloom"] == pytest.approx(int8["tokens_per_s"] / kv["tokens_per_s"],
                                                                       rel=0.01)
    peers = {p["name"]: p for p in result["peers"]}
    assert peers.keys() == {"static8", "cb512"}
    for peer in peers.values():
        assert peer["error"] is None, peer["error"]
        assert peer["tokens_per_s"] > 0 and peer["dtype"] == "float32" and peer["compared_with"] == "kvloom"
    assert peers["static8"]["matches_kvloom"] == 4  # float32 greedy: exactly transformers' tokens
    summary = result["summary"]
    assert summary["best_peer"] in peers and summary["ratio_to_best_peer"] > 0
    assert summary["agreement"]["float32"]["all_match"] and summary["float32_all_match"] is True
    floor = result["floor"]
    assert floor["dtype"] == "float32" and floor["floor_s"] > 0 and floor["rates"]["matmul_gflops"] > 0
    # Both rounded in the JSON (a tiny model: microseconds), hence the loose match.
    assert floor["kvloom_pct_of_floor"] == pytest.approx(100 * floor["floor_s"] / kv["wall_s"], rel=0.1, abs=0.1)


def test_bench_throughput_on_a_fast_bf16_cpu_checks_float32_with_a_second_kvloom(
    tmp_path: Path, checkpoint_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kvloom.bench import machine
    from kvloom.models.dtype_choice import CpuMatmulSupport

    # An AMX CPU, faked: kvloom's default is bf16 (emulated here, fine on a tiny model); the ceilings
    # are faked too, since measuring bf16 here would emulate a 2048^3 bf16 matmul (minutes).
    fake_cpu(monkeypatch, CpuMatmulSupport(amx=True, avx512_bf16=True))
    ceilings = {"matmul_2048_gflops": 100.0, "linear_m1_gflops": 10.0, "linear_m16_gflops": 50.0,
                "linear_m64_gflops": 80.0, "matmul_2048_bf16_gflops": 400.0, "linear_m64_bf16_gflops": 300.0,
                "copy_gbps": 20.0}
    monkeypatch.setattr(machine, "measure_ceilings", lambda **kwargs: ceilings)
    model_dir = checkpoint_factory(arch="llama", with_tokenizer=False)
    out_json = tmp_path / "bench.json"
    argv = ["bench", "throughput", "--model", str(model_dir), "--num-requests", "3", "--output-len", "3",
            "--peers", "static4,static4@bf16", "--json", str(out_json), "--quick"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "kvloom (bf16) / best transformers (static4" in printed
    assert "same greedy tokens, float32 (against kvloom@fp32): static4 3/3" in printed

    result = json.loads(out_json.read_text())
    kv, kv32 = result["kvloom"], result["kvloom_fp32"]
    assert (kv["name"], kv["dtype"]) == ("kvloom", "bfloat16") and "AMX" in kv["dtype_reason"]
    assert (kv32["name"], kv32["dtype"]) == ("kvloom@fp32", "float32") and kv32["tokens_per_s"] > 0
    peers = {p["name"]: p for p in result["peers"]}
    assert peers["static4"]["compared_with"] == "kvloom@fp32" and peers["static4"]["matches_kvloom"] == 3
    assert peers["static4@bf16"]["compared_with"] == "kvloom" and peers["static4@bf16"]["dtype"] == "bfloat16"
    agreement = result["summary"]["agreement"]
    assert agreement["float32"] == {"compared_with": "kvloom@fp32", "requests": 3, "peers": {"static4": 3},
                                    "all_match": True}
    assert agreement["bfloat16"]["compared_with"] == "kvloom" and "static4@bf16" in agreement["bfloat16"]["peers"]
    assert result["summary"]["float32_all_match"] is True and result["summary"]["kvloom_dtype"] == "bfloat16"
    # The headline is kvloom's default (bf16) against the fastest peer of any dtype.
    best = max(result["peers"], key=lambda p: p["tokens_per_s"])
    assert result["summary"]["best_peer"] == best["name"]
    assert result["summary"]["ratio_to_best_peer"] == pytest.approx(kv["tokens_per_s"] / best["tokens_per_s"], rel=0.01)
    floor = result["floor"]  # in kvloom's dtype, at the bf16 rates
    assert floor["dtype"] == "bfloat16" and floor["rates"] == {"matmul_gflops": 400.0, "linear_m64_gflops": 300.0,
                                                               "copy_gbps": 20.0}


def test_bench_reports_a_failing_peer_instead_of_crashing(
    tmp_path: Path, checkpoint_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("generate_batch() got an unexpected keyword argument 'x'")

    monkeypatch.setattr("kvloom.bench.throughput.run_peer", broken)
    out_json = tmp_path / "bench.json"
    argv = ["bench", "throughput", "--model", str(checkpoint_factory(arch="llama", with_tokenizer=False)),
            "--num-requests", "2", "--output-len", "2", "--peers", "cb64", "--json", str(out_json), "--quick"]
    assert main(argv) == 0
    assert "unexpected keyword argument" in capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert result["peers"][0]["error"].startswith("TypeError") and result["peers"][0]["tokens_per_s"] is None
    assert result["summary"]["best_peer"] is None and result["kvloom"]["tokens_per_s"] > 0


@pytest.mark.parametrize("command", [["demo"], ["serve"], ["bench", "throughput"], ["bench", "decode"]])
def test_a_missing_model_directory_is_one_line_and_exit_1(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    missing = tmp_path / "no-such-model"
    assert main([*command, "--model", str(missing)]) == 1
    out, err = capsys.readouterr()
    assert err == f"kvloom {command[0]}: error: --model: {missing} is not a directory\n" and out == ""


@pytest.mark.parametrize("command", ["demo", "serve"])
def test_a_bad_checkpoint_is_one_line_naming_it_and_debug_shows_the_traceback(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))

    assert main([command, "--model", str(empty)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"kvloom {command}: error: ") and "config.json not found" in err

    assert main([command, "--model", str(gpt2)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'GPT2LMHeadModel' is not supported" in err

    from kvloom import UnsupportedModelError

    with pytest.raises(UnsupportedModelError):
        main(["--debug", command, "--model", str(gpt2)])


def test_a_bad_setting_is_one_line_naming_the_field(
    checkpoint_factory: Callable[..., Path], capsys: pytest.CaptureFixture[str],
) -> None:
    model_dir = checkpoint_factory(arch="llama")
    capsys.readouterr()  # the build's progress bar
    assert main(["serve", "--model", str(model_dir), "--engine", "block_size=0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kvloom serve: error: block_size: ") and err.count("\n") == 1


def test_the_cli_imports_no_web_framework() -> None:
    code = ("import sys, kvloom.cli; kvloom.cli.build_parser(); "
            "print([m for m in ('fastapi', 'uvicorn', 'openai') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr

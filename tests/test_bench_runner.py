"""The offline benchmarks' shared skeleton (``kvloom.bench.runner``) and their kvloom settings
(``kvloom.bench.settings``), without running an engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvloom.bench import machine, runner
from kvloom.bench.runner import BenchRun, System, take_turns
from kvloom.bench.settings import kvloom_config, parse_config
from kvloom.bench.workload import Workload
from kvloom.models.checkpoints import STANDARD_MODEL


def test_the_command_line_reruns_the_benchmark() -> None:
    assert runner.command_line("lora", ["bench", "lora", "--rank", "4"]) == "python -m kvloom bench lora --rank 4"
    # run(args, argv) called with the benchmark's own flags only: the subcommand is put in front.
    assert runner.command_line("lora", ["--rank", "4"]) == "python -m kvloom bench lora --rank 4"
    assert runner.command_line("tools", ["--debug", "bench", "tools", "--model", "a b"]) == (
        "python -m kvloom --debug bench tools --model 'a b'")


def test_refuse_is_one_line_naming_the_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.refuse("decode", ValueError("--concurrency: no")) == 2
    assert capsys.readouterr().err == "bench decode: --concurrency: no\n"


def test_systems_take_turns_and_a_failing_peer_sits_out(capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []

    def make(name: str, fail_on: int | None = None) -> System[int]:
        def run() -> int:
            calls.append(name)
            if fail_on is not None and calls.count(name) == fail_on:
                raise TypeError(f"{name} broke")
            return calls.count(name)
        return System(name, run, fallible=fail_on is not None, label=name.upper())

    systems = [make("kvloom"), make("peer", fail_on=2), make("other"), make("never", fail_on=1)]
    turns = take_turns(systems, 3, errors={"other": "load: OSError: gone"})
    assert calls == ["kvloom", "peer", "never", "kvloom", "peer", "kvloom"]  # A B A B A: rounds, in order
    assert turns.runs == {"kvloom": [1, 2, 3], "peer": [1], "other": [], "never": []}
    assert turns.errors == {"kvloom": None, "peer": "TypeError: peer broke", "other": "load: OSError: gone",
                            "never": "TypeError: never broke"}
    progress = capsys.readouterr().err.splitlines()
    assert progress[:3] == ["  pass 1: KVLOOM ...", "  pass 1: PEER ...", "  pass 1: NEVER ..."]
    assert len(progress) == len(calls)


def test_kvloom_failing_ends_the_turns_and_bad_turns_are_refused() -> None:
    def broken() -> int:
        raise RuntimeError("kvloom broke")

    with pytest.raises(RuntimeError, match="kvloom broke"):
        take_turns([System("kvloom", broken)], 2, progress=None)
    with pytest.raises(ValueError, match="distinct names"):
        take_turns([System("a", lambda: 1), System("a", lambda: 2)], 1)
    with pytest.raises(ValueError, match="repeats"):
        take_turns([System("a", lambda: 1)], 0)
    assert runner.attempt(lambda: None) is None
    assert runner.attempt(lambda: 1 / 0) == "ZeroDivisionError: division by zero"


def _fake_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "describe", lambda: {"cpu": "test CPU", "cpu_count": 2})
    monkeypatch.setattr(machine, "measure_ceilings", lambda **kwargs: {"matmul_2048_gflops": 10.0})


def test_start_prints_the_command_and_the_machine_then_finds_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    _fake_machine(monkeypatch)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 50}))
    bench = runner.start("throughput", ["bench", "throughput", "--model", str(tmp_path)], tmp_path, quick=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"command: python -m kvloom bench throughput --model {tmp_path}"
    assert out[1].startswith("machine: test CPU") and out[2] == "ceilings: matmul_2048_gflops 10"
    assert out[3].startswith("dtype='auto' here: float32")  # conftest's CPU: no bf16 units
    assert bench.model_dir == tmp_path and bench.spec is None and bench.info["auto_dtype"]["dtype"] == "float32"

    prompts = runner.workload_prompts(tmp_path, Workload(3, 2, 4, 5, seed=1), "repeats 1")
    assert prompts == Workload(3, 2, 4, 5, seed=1).prompts(50)
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith("workload: 3 requests, prompts 2-4 tokens (") and line.endswith("; repeats 1")


def test_a_missing_model_is_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(machine, "describe", lambda: pytest.fail("measured the machine"))
    with pytest.raises(NotADirectoryError, match="--model"):
        runner.start("decode", [], tmp_path / "missing", quick=True)
    assert capsys.readouterr().out == ""


def test_the_result_envelopes_and_the_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = BenchRun("python -m kvloom bench serve", ["bench", "serve"], {"cpu": "x"}, {"copy_gbps": 5.0},
                     tmp_path, STANDARD_MODEL)
    head = bench.envelope("serve", 3, mode="sweep", ceilings={"copy_gbps": 6.0})
    assert list(head) == ["benchmark", "mode", "schema_version", "command", "argv", "timestamp", "machine", "model"]
    assert head["machine"] == {"cpu": "x", "ceilings": {"copy_gbps": 6.0}}
    assert head["model"] == {"path": str(tmp_path), "spec": STANDARD_MODEL.cache_key}
    assert "mode" not in bench.envelope("serve", 3) and bench.envelope("serve", 3)["machine"]["ceilings"] == {
        "copy_gbps": 5.0}
    flat = bench.flat_envelope("lora", 1)
    assert list(flat) == ["schema_version", "bench", "command", "date", "machine", "ceilings", "model"]
    assert flat["model"] == str(tmp_path) and flat["ceilings"] == {"copy_gbps": 5.0}

    runner.write_result(None, head)
    assert capsys.readouterr().out == ""
    path = tmp_path / "out" / "r.json"
    runner.write_result(path, head)
    assert json.loads(path.read_text()) == head and capsys.readouterr().out == f"wrote {path}\n"


def test_kvloom_settings() -> None:
    assert parse_config(["block_size=16", "dtype=float32", "x=[1, 2]"]) == {
        "block_size": 16, "dtype": "float32", "x": [1, 2]}
    with pytest.raises(ValueError, match="--kvloom-config: expected KEY=VALUE"):
        parse_config(["block_size"])
    prompts = [[1] * 10, [2] * 30]
    # Blocks of 16 hold every request's prompt and output at once (+1 each), every request may run.
    config = kvloom_config({"block_size": 16}, prompts, output_len=6)
    assert config["num_kv_blocks"] == (1 + 1) + (3 + 1) and config["max_num_seqs"] >= 2
    assert kvloom_config({"num_kv_blocks": 7, "max_num_seqs": 1}, prompts, 6) == {"num_kv_blocks": 7, "max_num_seqs": 1}

"""``kvloom bench tools`` end to end on a tiny checkpoint with a tool-calling template (shape of
the output and validity of the calls, not speed: speed targets live in docs/benchmarks.md)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kvloom.bench.agent_workload import SCHEMAS
from kvloom.cli import main


def test_bench_tools_tiny(tmp_path: Path, checkpoint_factory: Callable[..., Path],
                          capsys: pytest.CaptureFixture[str]) -> None:
    model = checkpoint_factory(arch="llama", chat_template="hermes", max_position_embeddings=8192)
    out_json = tmp_path / "tools.json"
    argv = ["bench", "tools", "--model", str(model), "--conversations", "3", "--answer-max-tokens", "6",
            "--repeats", "2", "--json", str(out_json), "--quick"]
    assert main(argv) == 0  # non-zero if a first turn made no call or any call failed to validate
    printed = capsys.readouterr().out
    assert "kvloom tools / unconstrained (same messages, same lengths):" in printed
    result = json.loads(out_json.read_text())
    validity = result["validity"]
    # Two constrained runs of three conversations: every first turn ended in a valid call.
    assert validity["first_turns"] == validity["first_turn_calls"] == 6
    assert validity["valid"] == validity["calls"] >= 6
    # The replay generated exactly the constrained run's tokens, without any grammar.
    assert result["unconstrained"]["output_tokens"] == result["constrained"]["output_tokens"]
    assert result["unconstrained"]["mask_ms_per_step"] is None and result["constrained"]["mask_ms_per_step"] > 0
    assert len(result["constrained"]["tokens_per_s_runs"]) == len(result["unconstrained"]["tokens_per_s_runs"]) == 2
    assert result["ratio"] > 0
    turns = result["sample_conversation"]
    assert turns[0]["finish_reason"] == "tool_calls"
    call = turns[0]["tool_calls"][0]["function"]
    assert call["name"] in SCHEMAS and isinstance(json.loads(call["arguments"]), dict)
    # The second and third turns' messages carry the call and its result, and find the earlier turns cached.
    assert turns[1]["messages"][1]["tool_calls"][0]["function"] == call
    assert turns[1]["messages"][2]["role"] == "tool"
    assert turns[0]["cached_tokens"] < turns[1]["cached_tokens"] < turns[2]["cached_tokens"]


def test_without_the_bench_extra_the_validity_check_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvloom.bench.tools import validity

    monkeypatch.setitem(sys.modules, "jsonschema", None)  # import jsonschema raises ImportError
    with pytest.raises(ImportError, match=r"needs jsonschema .*pip install 'kvloom\[bench\]'"):
        validity([])

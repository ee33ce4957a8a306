"""The training command and the held-out evaluation, end to end on a model small enough to train in
seconds: what they write is a real checkpoint that transformers and kvloom load, and the evaluation
reports every metric through the engine. (The real run is ~1 hour and never runs in CI.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvloom.demo_model import train
from kvloom.demo_model.evaluate import Report, _copied_share, evaluate


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo-model")
    argv = ["--out", str(out), "--repeat-steps", "2", "--induction-steps", "3", "--induction-rows", "4",
            "--steps", "4", "--stop-after", "4", "--beside", "induction", "--induction-rows-later", "2", "--token-budget", "1024", "--hidden", "32", "--layers", "1",
            "--heads", "2", "--kv-heads", "1", "--ffn", "64", "--vocab", "600", "--tokenizer-examples", "1500",
            "--eval-every", "2", "--eval-per-task", "2", "--threads", "1"]
    assert train.main(argv) == 0
    return out


def test_training_writes_a_checkpoint_and_its_log(smoke_checkpoint: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "training_log.json"):
        assert (smoke_checkpoint / name).is_file(), name
    config = json.loads((smoke_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    log = json.loads((smoke_checkpoint / "training_log.json").read_text())
    assert [len(log["repeat"]), len(log["induction"])] == [0, 0]  # logged every 50 lesson steps
    assert [e["step"] for e in log["evals"]] == [2, 4]
    assert all(math.isfinite(e["heldout_loss"]) and 0 <= e["span_copy_accuracy"] <= 1 for e in log["evals"])
    assert set(log["evals"][-1]["exact"]) >= {"qa", "tool_call", "json", "code_edit", "summary", "copy"}


def test_transformers_loads_the_checkpoint_and_its_chat_template(smoke_checkpoint: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smoke_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(smoke_checkpoint, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), model.config.vocab_size)


def test_evaluation_reports_every_metric_through_the_engine(smoke_checkpoint: Path) -> None:
    report = evaluate(smoke_checkpoint, per_task=2, dtype="float32")
    assert isinstance(report, Report)
    assert set(report.totals) == {
        "qa (exact span)", "tool choice", "tool call (choice and arguments)",
        "tool answer (reply holds the tool's result)", "no tool fits: answers in text", "json valid", "json exact",
        "json valid (grammar)", "json exact (grammar)", "code edit (whole function exact)",
        "summary (key sentences exact)"}
    assert all(report.totals[m] >= 1 for m in report.totals)
    assert math.isfinite(report.perplexity) and report.perplexity > 1 and 0 <= report.copied <= 1
    table = report.table()
    assert "| qa (exact span) |" in table and "perplexity per reply token" in table


def test_copied_share_counts_reply_tokens_inside_runs_found_in_the_prompt() -> None:
    prompt = [7, 1, 2, 3, 4, 5, 8]
    assert _copied_share(prompt, [1, 2, 3, 4, 5, 9]) == (5, 6)
    assert _copied_share(prompt, [1, 2, 3, 9, 4, 5]) == (0, 6)  # no run of 4 in the prompt
    assert _copied_share(prompt, []) == (0, 0)


def test_induction_rows_are_predictable_only_by_matching_content() -> None:
    """Every id the lesson trains on follows an earlier occurrence of its predecessor with the same
    next id (so an induction head predicts it), and copies sit at many distances from their sources
    (so a head attending at one fixed offset, what the run-5 lesson taught, does not)."""
    import random

    from kvloom.demo_model.data import induction_row

    rng = random.Random(0)
    distances: set[int] = set()
    trained = 0
    for _ in range(200):
        ids, mask = induction_row(rng, rng.randint(48, 128), first_id=261, vocab_size=2048, bos_id=0)
        assert len(ids) == len(mask) and mask[0] == 0
        assert all(261 <= i < 2048 for i in ids[1:])
        for i, m in enumerate(mask):
            if m:
                trained += 1
                sources = [j for j in range(i - 1) if ids[j] == ids[i - 1] and ids[j + 1] == ids[i]]
                assert sources, (i, ids)
                distances.add(i - sources[-1] - 1)
    assert trained > 200 * 10
    assert len(distances) > 50

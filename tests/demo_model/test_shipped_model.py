"""The trained demo model that ships in the package: a real checkpoint transformers loads, on which
kvloom's greedy tokens equal transformers' and which does on held-out examples what it was trained for."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from kvloom import LLM, SamplingParams
from kvloom.demo_model.corpus import generate
from kvloom.demo_model.shipped import WEIGHTS_DIR, shipped_model_dir
from kvloom.demo_model.tokenizer import render
from tests.engine.reference import hf_greedy

MAX_NEW = 40


def test_shipped_checkpoint_is_a_complete_hf_directory() -> None:
    model_dir = shipped_model_dir()
    assert model_dir == WEIGHTS_DIR
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (model_dir / name).is_file(), name
    size = sum(p.stat().st_size for p in model_dir.iterdir())
    assert size < 40 * 2**20, f"{size / 2**20:.1f} MB"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype" if "torch_dtype" in config
                                                                        else "dtype"] == "float16"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template and "<tool_call>" in tokenizer.chat_template
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == [1, 4]


def test_a_name_is_the_same_tokens_after_a_space_and_a_quote() -> None:
    """Copying a name or a number from a sentence into a JSON string is a plain copy of tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shipped_model_dir())
    for value in ("Brizo", "Kelmar Vosh", "4821", "华明"):  # names and numbers; lower-case words merge with the space
        after_space = tokenizer.encode(f"is {value}.")
        after_quote = tokenizer.encode(f'"{value}"')
        inner = tokenizer.encode(value)
        assert after_space[-1 - len(inner):-1] == inner and after_quote[1:1 + len(inner)] == inner, value


def _chat_prompts() -> list[list[int]]:
    """Rendered held-out chats of several tasks and lengths (prompt only, ready for the reply)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shipped_model_dir())
    rng = random.Random(11)
    prompts = []
    for task in ("qa", "tool_call", "json", "code_edit", "story", "summary", "tool_loop", "fact"):
        example = generate(task, rng, "heldout")
        text = render(example.messages[:-1], example.tools, add_generation_prompt=True)
        prompts.append(tokenizer.encode(text))
    return prompts


@pytest.mark.parametrize("case", [{}, {"block_size": 16, "num_kv_blocks": 40, "max_num_batched_tokens": 64}],
                         ids=["default", "tight_pool_chunked"])
def test_greedy_tokens_equal_transformers_on_a_mixed_batch(case: dict[str, int]) -> None:
    model_dir = shipped_model_dir()
    prompts = _chat_prompts()
    assert len({len(p) for p in prompts}) == len(prompts)  # mixed lengths in one batch
    llm = LLM(model_dir, dtype="float32", **case)
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=3))
    for prompt, result in zip(prompts, results, strict=True):
        ref = hf_greedy(model_dir, prompt, MAX_NEW)
        assert result.token_ids == ref.token_ids, f"prompt of {len(prompt)} tokens diverged"
        assert result.logprobs is not None
        for pos, lp in enumerate(result.logprobs):
            ids = [lp.token_id] + [t for t, _ in lp.top]
            ours = torch.tensor([lp.logprob] + [v for _, v in lp.top])
            torch.testing.assert_close(ours, ref.logprobs[pos, ids], atol=1e-4, rtol=0)
    llm.close()


def _rates(report: object) -> dict[str, float]:
    from kvloom.demo_model.evaluate import Report

    assert isinstance(report, Report)
    return {m: report.rate(m) for m in report.totals}


def test_heldout_sample_holds_what_the_shipped_model_reached(small_eval: object) -> None:
    """24 held-out examples per task through the engine (the full table, 100 per task, is in
    docs/demo-model.md: QA 73%, tool calls with their arguments 52%, JSON valid 97% / 98% with a
    grammar). Floors a little under those rates: a retrained or re-exported model that copies less
    fails here."""
    rates = _rates(small_eval)
    assert rates["qa (exact span)"] >= 0.55, rates
    assert rates["tool choice"] >= 0.55, rates
    assert rates["tool call (choice and arguments)"] >= 0.35, rates
    assert rates["json valid"] >= 0.85 and rates["json valid (grammar)"] >= 0.85, rates
    assert rates["summary (key sentences exact)"] >= 0.9, rates
    assert rates["no tool fits: answers in text"] >= 0.9, rates
    from kvloom.demo_model.evaluate import Report

    assert isinstance(small_eval, Report) and small_eval.copied > 0.4


@pytest.mark.xfail(strict=True, reason="the issue's targets are not met: the shipped model reaches QA 73% and tool calls "
                                        "with their arguments 52% on the held-out split, short of 90% (docs/demo-model.md: "
                                        "what it would take)")
def test_heldout_sample_meets_the_targets(small_eval: object) -> None:
    """The issue's targets: QA, tool calls with their arguments and unconstrained JSON at 90% or more;
    JSON with a grammar always valid."""
    rates = _rates(small_eval)
    assert rates["qa (exact span)"] >= 0.9, rates
    assert rates["tool call (choice and arguments)"] >= 0.9, rates
    assert rates["json valid"] >= 0.9, rates
    assert rates["json valid (grammar)"] == 1.0, rates


def test_demo_model_files_are_package_data() -> None:
    """pyproject ships weights/ with the package (a wheel without them would fail at the first demo)."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-data"]["kvloom.demo_model"] == ["weights/*"]

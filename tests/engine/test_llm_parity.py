"""kvloom's greedy outputs equal transformers' token for token, and its logits match to 1e-4.

Every architecture, prompts shorter than a block, exactly a block and several blocks plus a
few tokens, block sizes 1/16/32, and a pool only just large enough for the longest request
(which forces preemption and recompute) together with a small token budget (which forces
chunked prefill).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvloom import LLM, SamplingParams
from tests.conftest import ARCHS
from tests.engine.reference import hf_greedy

MAX_NEW = 12
PROMPT_LENS = (3, 9, 15, 16, 17, 32, 41, 50)


def prompts(vocab: int = 512, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


CASES = {
    "block16": dict(block_size=16),
    "block1": dict(block_size=1),
    "block32": dict(block_size=32),
    # Just enough blocks for the longest request alone: 8 requests must take turns (preemption).
    "tight_pool_chunked": dict(
        block_size=16, num_kv_blocks=-(-(max(PROMPT_LENS) + MAX_NEW) // 16), max_num_batched_tokens=24
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_and_logprobs_equal_transformers(
    arch: str, case: str, checkpoint_factory: Callable[..., Path]
) -> None:
    model_dir = checkpoint_factory(arch=arch)
    batch = prompts()
    llm = LLM(model_dir, **CASES[case])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    results = llm.generate(batch, params)

    for prompt, result in zip(batch, results, strict=True):
        ref = hf_greedy(model_dir, prompt, MAX_NEW)
        assert result.token_ids == ref.token_ids, f"prompt of {len(prompt)} tokens diverged"
        assert result.finish_reason == "length"
        assert result.usage.prompt_tokens == len(prompt)
        assert result.usage.completion_tokens == MAX_NEW
        assert result.logprobs is not None and len(result.logprobs) == MAX_NEW
        for pos, lp in enumerate(result.logprobs):
            ids = [lp.token_id] + [t for t, _ in lp.top]
            ours = torch.tensor([lp.logprob] + [v for _, v in lp.top])
            torch.testing.assert_close(ours, ref.logprobs[pos, ids], atol=1e-4, rtol=0)
    if case == "tight_pool_chunked":
        assert llm.core.num_preemptions > 0, "the tight pool should have forced preemption"
    llm.core.assert_idle()


def test_tied_embeddings_and_rope_scaling_match_transformers(checkpoint_factory: Callable[..., Path]) -> None:
    for spec in (
        dict(arch="llama", tie_word_embeddings=True),
        dict(arch="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ):
        model_dir = checkpoint_factory(**spec)
        batch = prompts()[-3:]
        results = LLM(model_dir).generate(batch, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
        for prompt, result in zip(batch, results, strict=True):
            assert result.token_ids == hf_greedy(model_dir, prompt, MAX_NEW).token_ids, spec


def test_sharded_checkpoint_generates_identically(checkpoint_factory: Callable[..., Path]) -> None:
    whole = checkpoint_factory(arch="qwen2")
    sharded = checkpoint_factory(arch="qwen2", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    a = LLM(whole).generate(prompts(), params)
    b = LLM(sharded).generate(prompts(), params)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]

"""Automatic prefix caching end to end: same tokens with or without it, cached_tokens reported."""

from __future__ import annotations

import random
from pathlib import Path

from kvloom import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def shared_prefix_prompts(prefix_len: int = 70, count: int = 6) -> list[list[int]]:
    rng = random.Random(0)
    prefix = [rng.randrange(5, 512) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(5, 512) for _ in range(rng.randint(1, 20))] for _ in range(count)]


def test_outputs_are_identical_with_and_without_caching(llama_dir: Path) -> None:
    prompts = shared_prefix_prompts()
    off = LLM(llama_dir, enable_prefix_caching=False)
    on = LLM(llama_dir)
    expected = [r.token_ids for r in off.generate(prompts, GREEDY)]
    first = on.generate(prompts[:1], GREEDY)[0]
    assert first.usage.cached_tokens == 0
    rest = on.generate(prompts[1:], GREEDY)
    assert [first.token_ids] + [r.token_ids for r in rest] == expected
    assert [r.usage.cached_tokens for r in rest] == [64] * 5, "70 shared tokens = 4 whole blocks of 16"
    assert on.kv_cache_stats().hit_rate > 0
    on.core.assert_idle()
    off.core.assert_idle()


def test_a_repeated_prompt_recomputes_only_its_last_block(llama_dir: Path) -> None:
    llm = LLM(llama_dir)
    prompt = list(range(10, 58))  # 48 tokens: exactly 3 blocks
    a = llm.generate([prompt], GREEDY)[0]
    b = llm.generate([prompt], GREEDY)[0]
    assert b.token_ids == a.token_ids
    assert b.usage.cached_tokens == 32, "the last token is always computed, so its block is too"


def test_preempted_requests_recompute_from_the_cache_with_identical_outputs(llama_dir: Path) -> None:
    prompts = shared_prefix_prompts(prefix_len=40, count=8)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = [r.token_ids for r in LLM(llama_dir, enable_prefix_caching=False).generate(prompts, params)]
    tight = LLM(llama_dir, num_kv_blocks=10, max_num_batched_tokens=32)
    assert [r.token_ids for r in tight.generate(prompts, params)] == expected
    assert tight.core.num_preemptions > 0
    tight.core.assert_idle()


def test_n_choices_share_the_prompts_blocks_and_copy_only_the_diverging_one(llama_dir: Path) -> None:
    prompt = list(range(10, 50))  # 40 tokens: 2 full blocks of 16, and block 2 holds tokens 32..39
    params = SamplingParams(temperature=1.0, seed=11, n=4, max_tokens=4, ignore_eos=True)
    # Caching off: any sharing here comes from the fork itself.
    llm = LLM(llama_dir, enable_prefix_caching=False)
    together = llm.generate([prompt], params)[0]
    # The source holds 3 blocks; each other choice shares blocks 0-1 and gets one copy of block 2
    # (without forks: 4 x 3 = 12). Wrong or missing copies would change the choices' tokens below.
    assert llm.kv_cache_stats().peak_used_blocks == 3 + 3
    separate = LLM(llama_dir, enable_prefix_caching=False)
    for i, choice in enumerate(together.choices):
        alone = separate.generate([prompt], params.model_copy(update={"n": 1, "seed": 11 + i}))[0]
        assert choice.token_ids == alone.token_ids
    llm.core.assert_idle()


def test_forks_with_a_cached_prefix_and_under_preemption(llama_dir: Path) -> None:
    prompts = shared_prefix_prompts(prefix_len=40, count=3)
    params = SamplingParams(temperature=0.9, seed=3, n=3, max_tokens=12, ignore_eos=True)
    expected = [[c.token_ids for c in r.choices] for r in LLM(llama_dir).generate(prompts, params)]
    tight = LLM(llama_dir, num_kv_blocks=9, max_num_batched_tokens=24)
    got = [[c.token_ids for c in r.choices] for r in tight.generate(prompts, params)]
    assert got == expected
    assert tight.core.num_preemptions > 0
    tight.core.assert_idle()


def test_reset_prefix_cache_makes_a_repeated_prompt_recompute_with_the_same_tokens(llama_dir: Path) -> None:
    llm = LLM(llama_dir)
    prompt = list(range(10, 58))  # 48 tokens: exactly 3 blocks
    first = llm.generate([prompt], GREEDY)[0]
    assert llm.reset_prefix_cache() >= 2, "the prompt's first blocks were cached and are free again"
    again = llm.generate([prompt], GREEDY)[0]
    assert again.usage.cached_tokens == 0, "nothing of the repeated prompt may come from the cache"
    assert again.token_ids == first.token_ids
    assert llm.generate([prompt], GREEDY)[0].usage.cached_tokens == 32, "caching still works afterwards"
    llm.core.assert_idle()

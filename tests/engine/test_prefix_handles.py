"""Prefix-cache handles: compute a prefix once, pin it, reuse it; budgets, salts, release."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest

from kvloom import LLM, AsyncEngine, InvalidRequestError, SamplingParams
from kvloom.errors import PrefixBudgetError

pytestmark = pytest.mark.anyio

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SYSTEM = [{"role": "system", "content": "You are a helpful assistant. Answer briefly and politely. " * 3}]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 512) for _ in range(n)]


def assert_all_free(engine: AsyncEngine) -> None:
    engine.assert_idle()


async def test_handle_outputs_equal_caching_off_and_cached_tokens_equal_its_blocks(llama_dir: Path) -> None:
    prefix, questions = tokens(70, 1), [tokens(9, s) for s in range(4)]
    off = LLM(llama_dir, enable_prefix_caching=False)
    expected = [r.token_ids for r in off.generate([prefix + q for q in questions], GREEDY)]
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        handle = await engine.cache_prefix(prefix)
        assert (handle.num_tokens, handle.num_blocks) == (70, 4)
        assert engine.prefixes() == [handle]
        results = [await engine.generate(q, GREEDY, prefix=handle) for q in questions]
        assert [r.token_ids for r in results] == expected
        assert [r.usage.cached_tokens for r in results] == [handle.num_cached_tokens] * 4 == [64] * 4
        assert handle.hits == 4
        stats = engine.prefix_cache_stats()
        assert stats is not None and stats.pinned_blocks == 4 and stats.hit_rate > 0
        handle.release()
        assert engine.prefixes() == []
        await engine.generate([1, 2], SamplingParams(max_tokens=1))  # a step applies the unpin
        assert_all_free(engine)


async def test_a_pinned_prefix_survives_a_flood_and_is_evictable_after_release(llama_dir: Path) -> None:
    prefix = tokens(64, 2)
    async with AsyncEngine.from_pretrained(llama_dir, num_kv_blocks=24) as engine:
        async with await engine.cache_prefix(prefix) as handle:
            for seed in range(10):  # unrelated prompts that cycle through every other block
                await engine.generate(tokens(100, 100 + seed), GREEDY)
            again = await engine.generate([7, 7, 7], GREEDY, prefix=handle)
            assert again.usage.cached_tokens == 64
        for seed in range(10):
            await engine.generate(tokens(100, 200 + seed), GREEDY)
        after = await engine.generate([*prefix, 7, 7, 7], GREEDY)
        assert after.usage.cached_tokens == 0, "released blocks are evicted like any others"
        assert_all_free(engine)


async def test_chat_requests_starting_with_the_handles_messages_reuse_it(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        handle = await engine.cache_prefix(messages=SYSTEM)
        user = [{"role": "user", "content": "What is the capital of France?"}]
        other = [{"role": "user", "content": "How many days are in a week?"}]
        via_handle = await engine.generate(messages=user, params=GREEDY, prefix=handle)
        auto = await engine.generate(messages=[*SYSTEM, *other], params=GREEDY)
        plain = LLM(llama_dir, enable_prefix_caching=False).chat([*SYSTEM, *user], GREEDY)[0]
        assert via_handle.token_ids == plain.token_ids
        assert via_handle.usage.cached_tokens == auto.usage.cached_tokens == handle.num_cached_tokens > 0
        assert handle.hits == 2
        handle.release()


async def test_pin_budget_is_enforced_with_a_clear_error(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir, num_kv_blocks=20, prefix_pin_fraction=0.25) as engine:
        first = await engine.cache_prefix(tokens(64, 3))  # 4 blocks of the 5 allowed
        with pytest.raises(PrefixBudgetError, match="prefix_pin_fraction"):
            await engine.cache_prefix(tokens(32, 4))
        first.release()
        second = await engine.cache_prefix(tokens(32, 4))
        second.release()


async def test_salts_isolate_caches(llama_dir: Path) -> None:
    prompt = tokens(50, 5)
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        await engine.generate(prompt, GREEDY, cache_salt="tenant-a")
        same = await engine.generate(prompt, GREEDY, cache_salt="tenant-a")
        other = await engine.generate(prompt, GREEDY, cache_salt="tenant-b")
        unsalted = await engine.generate(prompt, GREEDY)
        assert same.usage.cached_tokens == 48
        assert other.usage.cached_tokens == 0 and unsalted.usage.cached_tokens == 0
        assert other.token_ids == same.token_ids
        handle = await engine.cache_prefix(prompt, cache_salt="tenant-b")
        with pytest.raises(InvalidRequestError, match="cache_salt"):
            engine.stream([1], GREEDY, prefix=handle, cache_salt="tenant-a")
        handle.release()


async def test_released_and_foreign_handles_are_refused(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as one, AsyncEngine.from_pretrained(llama_dir) as two:
        handle = await one.cache_prefix(tokens(40, 6))
        with pytest.raises(InvalidRequestError, match="another"):
            two.stream([1, 2], GREEDY, prefix=handle)
        handle.release()
        with pytest.raises(InvalidRequestError, match="released"):
            one.stream([1, 2], GREEDY, prefix=handle)


async def test_concurrent_requests_on_one_handle_with_preemption(llama_dir: Path) -> None:
    prefix = tokens(48, 7)
    questions = [tokens(5 + i, 300 + i) for i in range(12)]
    expected = [r.token_ids for r in LLM(llama_dir).generate([prefix + q for q in questions], GREEDY)]
    async with AsyncEngine.from_pretrained(llama_dir, num_kv_blocks=14, max_num_batched_tokens=32) as engine:
        handle = await engine.cache_prefix(prefix)
        results: dict[int, list[int]] = {}

        async def run(i: int) -> None:
            results[i] = (await engine.generate(questions[i], GREEDY, prefix=handle)).token_ids

        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(run, i)
        assert [results[i] for i in range(12)] == expected
        handle.release()
        await engine.generate([1, 2], SamplingParams(max_tokens=1))
        assert_all_free(engine)

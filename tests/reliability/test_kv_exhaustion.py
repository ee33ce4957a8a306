"""KV exhaustion: demand far above the pool completes through preemption with the same tokens as
an unconstrained pool; a request that can never fit is refused at submit; pinned prefix handles
at their budget plus a full pool of requests still make progress.

``KVLOOM_STRESS=1`` scales the oversubscription test up (more requests, 20x the pool).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import anyio
import pytest

from kvloom import LLM, AsyncEngine, InvalidRequestError, SamplingParams
from kvloom.errors import PrefixBudgetError
from tests.engine.helpers import assert_settles_idle
from tests.fakes import STRESS

BLOCK = 16  # the default block_size


def _tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(5, 512) for _ in range(n)]


def _blocks(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK)


def _workload(count: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Distinct random prompts (a few share a prefix, so eviction of cached blocks is exercised
    too) with greedy, EOS-ignoring lengths of 8..32 tokens."""
    rng = random.Random(seed)
    shared = _tokens(2 * BLOCK, rng)
    prompts, params = [], []
    for i in range(count):
        body = _tokens(rng.randint(5, 40), rng)
        prompts.append(shared + body if i % 4 == 0 else body)
        params.append(SamplingParams(temperature=0.0, max_tokens=rng.randint(8, 32), ignore_eos=True))
    return prompts, params


def test_ten_times_the_pool_completes_through_preemption_with_unconstrained_tokens(llama_dir: Path) -> None:
    count, factor = (120, 20) if STRESS else (40, 10)
    prompts, params = _workload(count, seed=1)
    needs = [_blocks(len(p) + sp.max_tokens) for p, sp in zip(prompts, params, strict=True)]
    demand = sum(needs)
    pool = max(max(needs), demand // factor)
    assert demand >= factor * pool, (demand, pool)

    roomy = LLM(llama_dir, num_kv_blocks=demand + 8)
    expected = [r.token_ids for r in roomy.generate(prompts, params, use_tqdm=False)]
    assert roomy.core.num_preemptions == 0, "the reference pool holds everything at once"

    tight = LLM(llama_dir, num_kv_blocks=pool, max_num_batched_tokens=64)
    start = time.monotonic()
    got = tight.generate(prompts, params, use_tqdm=False)
    elapsed = time.monotonic() - start
    assert [r.token_ids for r in got] == expected
    assert [len(r.token_ids) for r in got] == [sp.max_tokens for sp in params]
    assert all(r.finish_reason == "length" for r in got)
    assert tight.core.num_preemptions > 0, "a pool 1/10 of the demand must preempt"
    assert elapsed < (300 if STRESS else 120), f"{count} requests on {pool} blocks took {elapsed:.1f}s"
    stats = tight.kv_cache_stats()
    assert stats.peak_used_blocks <= pool
    tight.core.assert_idle()
    roomy.core.assert_idle()


def test_a_request_that_can_never_fit_fails_at_submit_and_others_are_served(llama_dir: Path) -> None:
    llm = LLM(llama_dir, num_kv_blocks=6)  # 96 tokens
    rng = random.Random(2)
    too_big = _tokens(80, rng)
    fits = _tokens(30, rng)
    with pytest.raises(InvalidRequestError, match=r"cannot fit in the KV cache \(96 tokens\) even alone"):
        llm.generate([too_big], SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True), use_tqdm=False)
    # One bad prompt in a batch queues nothing, and the engine then serves the good ones.
    with pytest.raises(InvalidRequestError, match="num_kv_blocks"):
        llm.generate([fits, too_big], SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True),
                     use_tqdm=False)
    llm.core.assert_idle()
    # Exactly the pool (80 + 16 = 96 tokens = 6 blocks) is accepted and completes.
    edge = llm.generate([too_big], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)[0]
    assert len(edge.token_ids) == 16
    ok = llm.generate([fits] * 3, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [len(r.token_ids) for r in ok] == [8, 8, 8]
    llm.core.assert_idle()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_pins_at_budget_plus_a_full_pool_still_make_progress(llama_dir: Path) -> None:
    pool = 24
    rng = random.Random(3)
    async with AsyncEngine.from_pretrained(llama_dir, num_kv_blocks=pool, prefix_pin_fraction=0.5,
                                           max_num_batched_tokens=64) as engine:
        handles = [await engine.cache_prefix(_tokens(4 * BLOCK, rng)) for _ in range(3)]  # 12 blocks: the budget
        with pytest.raises(PrefixBudgetError, match="prefix_pin_fraction"):
            await engine.cache_prefix(_tokens(BLOCK, rng))
        stats = engine.prefix_cache_stats()
        assert stats is not None and stats.pinned_blocks == pool // 2

        results: dict[int, list[int]] = {}

        async def run(i: int) -> None:
            params = SamplingParams(temperature=0.0, max_tokens=rng.randint(8, 24), ignore_eos=True)
            if i % 2:
                out = await engine.generate(_tokens(rng.randint(4, 20), rng), params, prefix=handles[i % 3])
            else:  # no prefix: competes for the 12 unpinned blocks
                out = await engine.generate(_tokens(rng.randint(10, 40), rng), params)
            assert len(out.token_ids) == params.max_tokens
            results[i] = out.token_ids

        # 24 concurrent requests wanting ~3 blocks each: several times the unpinned pool.
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(24):
                    tg.start_soon(run, i)
        assert len(results) == 24
        assert engine.core.num_preemptions > 0, "the unpinned part of the pool must have been oversubscribed"
        # The biggest request that fits beside the pins (the 12 unpinned blocks) also completes.
        with anyio.fail_after(30):
            big = await engine.generate(_tokens(100, rng), SamplingParams(temperature=0.0, max_tokens=92,
                                                                           ignore_eos=True))
        assert len(big.token_ids) == 92
        stats = engine.prefix_cache_stats()
        assert stats is not None and stats.pinned_blocks == pool // 2, "pins survive the pressure"
        for handle in handles:
            handle.release()
        await assert_settles_idle(engine)


@pytest.mark.anyio
async def test_a_request_that_cannot_fit_beside_the_pins_does_not_wait_forever(llama_dir: Path) -> None:
    rng = random.Random(4)
    async with AsyncEngine.from_pretrained(llama_dir, num_kv_blocks=24, prefix_pin_fraction=0.5) as engine:
        handles = [await engine.cache_prefix(_tokens(4 * BLOCK, rng)) for _ in range(3)]  # 12 of 24 pinned
        try:
            with anyio.fail_after(10):
                # 19 blocks > the 12 unpinned ones, <= the 24 of the pool: refused with a clear error,
                # whether its prompt cannot start (13 blocks) or it outgrows the room while decoding.
                for prompt_len in (200, 150):
                    with pytest.raises(InvalidRequestError, match=r"max_tokens: .*prefix handles pin 12 of the 24"):
                        await engine.generate(_tokens(prompt_len, rng),
                                              SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
                out = await engine.generate(_tokens(100, rng), SamplingParams(max_tokens=40, ignore_eos=True))
                assert len(out.token_ids) == 40, "a request that fits beside the pins still runs"
        finally:
            for handle in handles:
                handle.release()
        await assert_settles_idle(engine)

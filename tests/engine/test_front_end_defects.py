"""Regression tests for the defects found between the app's event loop and the engine thread.

Each test names the defect it covers; each was seen failing (or hanging) before the front-end
redesign. They run on asyncio and trio, and end with the engine holding nothing.
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import anyio
import pytest

from kvloom import (
    LLM,
    AsyncEngine,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidRequestError,
    SamplingParams,
)
from tests.engine.helpers import SETTLE_TIMEOUT_S, assert_settles_idle, greedy, tokens

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ---- defect 1 ------------------------------------------------------------------------------
async def test_a_finished_streams_finalizer_never_aborts_a_later_request_with_its_id(llama_dir: Path) -> None:
    """Defect 1: the old stream's ``weakref.finalize`` aborted by id, so dropping it ended the
    second ``job-1`` after a few tokens."""
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        first = engine.stream([1, 2, 3], greedy(4), request_id="job-1")
        assert [c.finish_reason async for c in first][-1] == "length"
        second = engine.stream([4, 5, 6], greedy(40), request_id="job-1")
        got: list[int] = []
        reasons = []
        async for chunk in second:
            got.extend(chunk.token_ids)
            reasons.append(chunk.finish_reason)
            if first is not None and len(got) >= 2:
                first = None  # type: ignore[assignment]  # drop the finished iterator: its finalizer runs
                gc.collect()
        assert len(got) == 40 and reasons[-1] == "length"
        await assert_settles_idle(engine)


# ---- defect 2 ------------------------------------------------------------------------------
async def test_cancelling_cache_prefix_at_any_moment_leaves_no_block_pinned(llama_dir: Path) -> None:
    """Defect 2: a ``cache_prefix`` cancelled after the engine pinned its blocks but before the
    caller claimed them leaked the pin (12 blocks for good) and shrank the pin budget."""
    async with AsyncEngine.from_pretrained(llama_dir, num_kv_blocks=64, prefix_pin_fraction=0.5) as engine:
        start = time.perf_counter()
        (await engine.cache_prefix(tokens(64, 0))).release()
        took = time.perf_counter() - start
        finished = 0
        # Cancel at 40 moments spread over twice one call's duration: before the submit, while
        # queued, while prefilling, and after the pin but before the claim.
        for i in range(40):
            with anyio.move_on_after(took * 2 * i / 40):
                (await engine.cache_prefix(tokens(64, 100 + i))).release()
                finished += 1
        assert 0 < finished < 40, "the sweep should cancel some calls and let others finish"
        await engine.wait_idle(timeout=SETTLE_TIMEOUT_S)
        stats = engine.prefix_cache_stats()
        assert stats is not None and stats.pinned_blocks == 0
        engine.assert_idle()
        # The whole budget is there again: 32 blocks = 8 prefixes of 4 blocks.
        again = [await engine.cache_prefix(tokens(64, 500 + i)) for i in range(8)]
        assert sum(h.num_blocks for h in again) == 32
        for handle in again:
            handle.release()
        await assert_settles_idle(engine)


async def test_a_pin_whose_caller_is_gone_is_released(llama_dir: Path) -> None:
    """The deterministic form of defect 2: the engine reports the pin after the caller left."""
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        assert engine._loop is not None and engine._prefixes is not None
        registry = engine._prefixes
        with anyio.CancelScope() as scope:
            original = registry.on_pinned

            def pinned_then_cancel(request_id: str, block_ids: list[int]) -> None:
                original(request_id, block_ids)
                scope.cancel()  # the caller is cancelled in the same loop turn that saw the pin

            registry.on_pinned = pinned_then_cancel  # type: ignore[method-assign]
            await engine.cache_prefix(tokens(64, 1))
        assert scope.cancelled_caught or scope.cancel_called
        assert registry.num_reserved == 0 and not registry.handles()
        await assert_settles_idle(engine)


# ---- defect 3 ------------------------------------------------------------------------------
@pytest.fixture
def lora_dirs(checkpoint_factory: object, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    from tests.lora.peft_helpers import make_peft_adapter

    base = checkpoint_factory(arch="llama")  # type: ignore[operator]
    dirs = {
        name: make_peft_adapter(base, tmp_path_factory.mktemp(f"pin_{name}"), r=8, alpha=16,
                                target_modules=["q_proj", "v_proj"], seed=seed)
        for seed, name in enumerate(("free", "a", "b", "c"))
    }
    return base, dirs


async def test_pinning_every_slot_while_an_unpinned_adapter_runs(lora_dirs: tuple[Path, dict[str, Path]]) -> None:
    """Defect 3: pinning two adapters with ``max_loras=2`` while a request ran on unpinned
    "free" raised in the next step and killed the engine; a request waiting on an unpinned
    adapter blocked the head of the queue forever. Now the running request keeps its slot and
    finishes, the waiting one fails with a clear error, and everything else is served."""
    base, dirs = lora_dirs
    llm = LLM(base, max_loras=4)
    for name, path in dirs.items():
        llm.load_adapter(name, path)
    prompt = [3, 1, 4, 1, 5]
    expected = {name: llm.generate([prompt], greedy(24), adapter=name)[0].token_ids for name in (*dirs, None)}
    async with AsyncEngine.from_pretrained(base, max_loras=2, max_num_seqs=1) as engine:
        for name, path in dirs.items():
            await engine.load_adapter(name, path)
        free_stream = engine.stream(prompt, greedy(24), adapter="free")
        got: list[int] = []
        async for chunk in free_stream:
            got.extend(chunk.token_ids)
            break
        waiting_c = engine.stream(prompt, greedy(4), adapter="c")  # queued: max_num_seqs=1
        waiting_base = engine.stream(prompt, greedy(24))  # queued behind it
        await engine.load_adapter("a", dirs["a"], pinned=True)
        await engine.load_adapter("b", dirs["b"], pinned=True)
        async for chunk in free_stream:
            got.extend(chunk.token_ids)
        assert got == expected["free"]
        with pytest.raises(InvalidRequestError, match=r"max_loras=2.*pinned"):
            async for _ in waiting_c:
                pass
        assert [t async for c in waiting_base for t in c.token_ids] == expected[None]
        # With both slots pinned: another adapter is refused at submit, naming the pins.
        with pytest.raises(InvalidRequestError, match=r"all max_loras=2 adapter slots are pinned \(a, b\)"):
            engine.stream(prompt, greedy(4), adapter="free")
        for name in ("a", "b"):
            assert (await engine.generate(prompt, greedy(24), adapter=name)).token_ids == expected[name]
        assert engine.stats().healthy
        await engine.load_adapter("a", dirs["a"], pinned=False)  # a slot frees up: "free" runs again
        assert (await engine.generate(prompt, greedy(24), adapter="free")).token_ids == expected["free"]
        await assert_settles_idle(engine)
    llm.close()


# ---- defect 4 ------------------------------------------------------------------------------
async def test_chunked_prefill_off_refuses_a_prompt_over_the_budget_naming_both_settings(llama_dir: Path) -> None:
    """Defect 4: the request waited forever and nothing said why."""
    async with AsyncEngine.from_pretrained(
        llama_dir, enable_chunked_prefill=False, max_num_batched_tokens=64,
    ) as engine:
        with pytest.raises(InvalidRequestError, match=r"max_num_batched_tokens=64.*enable_chunked_prefill=False"):
            engine.stream(tokens(100, 2), greedy(4))
        with pytest.raises(InvalidRequestError, match="enable_chunked_prefill"):
            await engine.generate(tokens(65, 2), greedy(4))
        assert (await engine.generate(tokens(64, 2), greedy(4))).usage.completion_tokens == 4
        await assert_settles_idle(engine)
    llm = LLM(llama_dir, enable_chunked_prefill=False, max_num_batched_tokens=64)
    with pytest.raises(InvalidRequestError, match="max_num_batched_tokens=64"):
        llm.generate([tokens(100, 2)], greedy(4))


async def test_chunked_prefill_off_with_preemption_finishes_every_request(llama_dir: Path) -> None:
    """A preempted request recomputes prompt + outputs, more than one step's budget: it is
    chunked rather than left waiting forever."""
    prompts = [tokens(40, 10 + i) for i in range(6)]
    alone = [LLM(llama_dir).generate([p], greedy(40))[0].token_ids for p in prompts[:1]]
    async with AsyncEngine.from_pretrained(
        llama_dir, enable_chunked_prefill=False, max_num_batched_tokens=48, num_kv_blocks=12,
        enable_prefix_caching=False,
    ) as engine:
        results: dict[int, list[int]] = {}

        async def run(i: int) -> None:
            results[i] = (await engine.generate(prompts[i], greedy(40))).token_ids

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(run, i)
        assert engine.stats().num_preemptions > 0
        assert results[0] == alone[0] and all(len(r) == 40 for r in results.values())
        await assert_settles_idle(engine)


# ---- defect 5, through the engine -----------------------------------------------------------
async def test_a_high_priority_request_gets_the_seat_a_preemption_frees(llama_dir: Path) -> None:
    """Defect 5 end to end: two requests run, KV pressure preempts the low-priority one, and
    the high-priority request waiting for a seat takes it at once, while the other request is
    still running (the preempted one used to jump back to the head of the queue and keep the
    seat until the other finished)."""
    # 8 blocks of 16: two requests of 16 + 60 tokens need 10, so one is preempted at ~64 tokens.
    async with AsyncEngine.from_pretrained(llama_dir, num_kv_blocks=8, max_num_seqs=2) as engine:
        started: list[str] = []
        finished: list[str] = []
        finished_when_started: dict[str, list[str]] = {}

        async def run(name: str, prompt: list[int], priority: int) -> None:
            async for chunk in engine.stream(prompt, greedy(60), priority=priority, request_id=name):
                if chunk.token_ids and name not in started:
                    started.append(name)
                    finished_when_started[name] = list(finished)
            finished.append(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "urgent-running", tokens(16, 1), 0)
            tg.start_soon(run, "batch", tokens(16, 2), 5)
            with anyio.fail_after(60):
                while len(started) < 2:
                    await anyio.sleep(0.001)
            tg.start_soon(run, "urgent-waiting", tokens(16, 3), 0)
        assert engine.stats().num_preemptions > 0
        assert finished_when_started["urgent-waiting"] == [], "it waited for a request to finish"
        await assert_settles_idle(engine)


# ---- the list --------------------------------------------------------------------------------
async def test_a_failure_while_routing_outputs_fails_every_stream_and_refuses_new_work(llama_dir: Path) -> None:
    """``_dispatch`` ran outside the loop's ``try``: an exception there ended the task without
    recording the error, so streams hung and submit kept accepting."""
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        assert engine._loop is not None

        def broken_dispatch(result: object) -> None:
            raise RuntimeError("routing failed")

        engine._loop._dispatch = broken_dispatch  # type: ignore[method-assign]
        with anyio.fail_after(30), pytest.raises(EngineError, match="routing failed"):
            await engine.generate([1, 2, 3], greedy(4))
        with pytest.raises(EngineDeadError):
            engine.stream([1, 2, 3], greedy(4))
        assert not engine.stats().healthy


async def test_a_handles_blocks_are_pinned_before_a_fork_can_take_them(llama_dir: Path) -> None:
    """The pin used to happen after ``update()`` freed the prefix request's blocks; a fork
    starting in that same update allocated one of them, so the handle lost a block."""
    async with AsyncEngine.from_pretrained(llama_dir, num_kv_blocks=4, prefix_pin_fraction=1.0) as engine:
        # Both go in one hand-off, so both prefill in one step: the fork source holds 2 blocks,
        # the prefix request 2, and nothing else is free when the fork wants its copy block.
        forked = engine.stream(tokens(20, 4), SamplingParams(n=2, max_tokens=2, seed=1, temperature=1.0))
        handle = await engine.cache_prefix(tokens(32, 5))
        assert handle.num_blocks == 2
        choices = [c async for c in forked]
        assert {c.index for c in choices if c.finish_reason == "length"} == {0, 1}
        handle.release()
        await assert_settles_idle(engine)


async def test_max_waiting_counts_fork_children_and_requests_waiting_for_a_grammar(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir, max_waiting=4) as engine:
        engine.stream([1, 2, 3], SamplingParams(n=4, max_tokens=2))  # 4 sequences waiting
        with pytest.raises(EngineOverloadedError, match="max_waiting=4"):
            engine.stream([1, 2, 3], greedy(2))
        await engine.wait_idle(timeout=SETTLE_TIMEOUT_S)
        assert engine._parts is not None
        import concurrent.futures

        blocked: concurrent.futures.Future[object] = concurrent.futures.Future()
        engine._parts.grammars.submit = lambda p: blocked if p.response_format else None  # type: ignore[assignment,method-assign,return-value]
        fmt = SamplingParams(response_format={"choice": ["yes", "no"]})
        held = [engine.stream([1, 2, 3], fmt) for _ in range(4)]
        with anyio.fail_after(30):  # handed over: they wait for the grammar in the engine thread
            while engine.stats().num_waiting != 4 or (engine._loop is not None and engine._loop.num_submitted):
                await anyio.sleep(0.005)
        with pytest.raises(EngineOverloadedError, match="4 sequences are waiting"):
            engine.stream([1, 2, 3], greedy(2))
        del held  # never iterated: dropping them aborts them (their finalizers)
        gc.collect()
        await assert_settles_idle(engine)


async def test_abort_from_another_thread_ends_the_stream_within_a_step(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        got = []
        async for chunk in engine.stream([1, 2, 3], greedy(400), request_id="far"):
            got.append(chunk)
            if len(got) == 2:
                threading.Thread(target=engine.abort, args=("far",)).start()
        assert got[-1].finish_reason == "abort" and sum(len(c.token_ids) for c in got) < 400
        await assert_settles_idle(engine)


async def test_a_wake_from_another_thread_reaches_a_sleeping_loop() -> None:
    """``anyio.Event.set`` from a thread does not wake a sleeping asyncio loop; the waker does."""
    from kvloom.engine.background import Waker

    waker = Waker()
    flag: list[bool] = []

    def later() -> None:
        time.sleep(0.05)
        flag.append(True)
        waker.wake_threadsafe()

    threading.Thread(target=later).start()
    with anyio.fail_after(5):
        await waker.wait(lambda: bool(flag))


async def test_aclose_keeps_the_event_loop_free_while_the_grammar_pools_shut_down(llama_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(llama_dir)
    await engine.start()
    assert engine._parts is not None
    grammars = engine._parts.grammars
    original = grammars.close

    def slow_close() -> None:
        time.sleep(0.5)
        original()

    grammars.close = slow_close  # type: ignore[method-assign]
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        await engine.aclose()
        tg.cancel_scope.cancel()
    assert ticks >= 10, f"the loop ticked {ticks} times during a 0.5 s shutdown"


async def test_long_prompts_are_tokenized_off_the_event_loop(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kvloom.engine.prompts

    INLINE_CHARS = 200
    monkeypatch.setattr(kvloom.engine.prompts, "INLINE_CHARS", INLINE_CHARS)
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        assert engine._submitter is not None and engine._parts is not None
        threads: dict[str, int] = {}
        for name, encoder in (("loop", engine._parts.encoder), ("worker", engine._submitter._worker_encoder)):
            original = encoder.to_token_ids

            def record(*args: object, _name: str = name, _orig: object = original, **kw: object) -> list[int]:
                threads[_name] = threading.get_ident()
                return _orig(*args, **kw)  # type: ignore[operator, no-any-return]

            encoder.to_token_ids = record  # type: ignore[method-assign]
        loop_thread = threading.get_ident()
        long_text = "the quick brown fox " * (INLINE_CHARS // 20 + 1)
        short = await engine.generate("hello", greedy(2))
        assert threads["loop"] == loop_thread and "worker" not in threads
        assert short.usage.completion_tokens == 2
        expected = LLM(llama_dir).generate([long_text[: INLINE_CHARS + 50]], greedy(2))[0].token_ids
        out = await engine.generate(long_text[: INLINE_CHARS + 50], greedy(2))
        assert threads["worker"] != loop_thread and out.token_ids == expected
        chunks = [c async for c in engine.stream(long_text[: INLINE_CHARS + 50], greedy(2))]
        assert [t for c in chunks for t in c.token_ids] == out.token_ids
        # The three tokenizers (loop, worker, engine thread) are distinct objects.
        tokenizers = {id(engine.tokenizer), id(engine._submitter._worker_encoder.tokenizer), id(engine._parts.driver.outputs.tokenizer)}
        assert len(tokenizers) == 3
        await assert_settles_idle(engine)


async def test_logprobs_of_a_constrained_request_are_the_models_own(llama_dir: Path) -> None:
    """Logprobs were taken after grammar masks: a constrained request's top-N held only the
    allowed tokens. Now they are the model's raw distribution, as for an unconstrained request."""
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        prompt = [5, 6, 7, 8]
        plain = await engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1, logprobs=5))
        constrained = await engine.generate(prompt, SamplingParams(
            temperature=0.0, max_tokens=3, logprobs=5, response_format={"choice": ["zzz", "qqq"]}))
        assert plain.choices[0].logprobs and constrained.choices[0].logprobs
        raw, masked = plain.choices[0].logprobs[0], constrained.choices[0].logprobs[0]
        assert [t for t, _ in masked.top] == [t for t, _ in raw.top]
        assert [lp for _, lp in masked.top] == pytest.approx([lp for _, lp in raw.top], abs=1e-5)
        await assert_settles_idle(engine)


def test_sampling_params_cannot_change_under_the_engine() -> None:
    stop = ["END"]
    params = SamplingParams(stop=stop, stop_token_ids=[7], logits_processors=[object])
    stop.append("MORE")
    assert params.stop == ("END",) and params.stop_token_ids == (7,)
    for seq in (params.stop, params.stop_token_ids, params.logits_processors):
        with pytest.raises(AttributeError):
            seq.append(1)  # type: ignore[union-attr]

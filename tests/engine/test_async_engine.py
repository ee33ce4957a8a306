"""AsyncEngine: streams, continuous batching, cancellation, failure, on asyncio and trio."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import ClassVar

import anyio
import pytest

from kvloom import (
    LLM,
    AsyncEngine,
    EngineClosedError,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InvalidRequestError,
    SamplingParams,
)
from kvloom.structured import LogitsProcessor
from tests.engine.helpers import assert_settles_idle

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def prompt_set(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 512) for _ in range(rng.randint(1, 60))] for _ in range(count)]


def assert_idle(engine: AsyncEngine) -> None:
    engine.assert_idle()


async def test_stream_chunks_add_up_to_the_completion(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        chunks = [c async for c in engine.stream("Once upon a time", greedy(12))]
        assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1].finish_reason == "length"
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 12
        assert usage.time_to_first_token is not None and usage.total_time is not None
        token_ids = [t for c in chunks for t in c.token_ids]
        text = "".join(c.text for c in chunks)
        assert engine.tokenizer.decode(token_ids, skip_special_tokens=True) == text
        completion = await engine.generate("Once upon a time", greedy(12))
        assert completion.token_ids == token_ids and completion.text == text
        assert_idle(engine)


async def test_200_concurrent_streams_equal_each_request_alone_even_with_preemption(llama_dir: Path) -> None:
    prompts = prompt_set(200)
    lengths = [1 + i % 9 for i in range(200)]
    llm = LLM(llama_dir)
    alone = [llm.generate([p], greedy(n))[0].token_ids for p, n in zip(prompts, lengths, strict=True)]
    # 12 blocks of 16 tokens: far too few for 200 requests, so requests are preempted and recomputed.
    async with AsyncEngine.from_pretrained(llama_dir, num_kv_blocks=12, max_num_batched_tokens=64) as engine:
        results: dict[int, list[int]] = {}

        async def run(i: int) -> None:
            results[i] = [t async for c in engine.stream(prompts[i], greedy(lengths[i])) for t in c.token_ids]

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(run, i)
        assert [results[i] for i in range(200)] == alone
        assert engine.stats().num_preemptions > 0
        assert_idle(engine)


async def test_short_request_submitted_after_a_long_one_finishes_first(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        order: list[str] = []
        long_started = anyio.Event()

        async def run(name: str, n: int) -> None:
            async for _ in engine.stream([7, 8, 9], greedy(n)):
                long_started.set()
            order.append(name)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "long", 200)
            # Submitted once the long one decodes (its first chunk), not after a fixed sleep,
            # which a loaded machine can stretch past the long request's end.
            await long_started.wait()
            tg.start_soon(run, "short", 3)
        assert order == ["short", "long"]


async def test_cancellation_storm_frees_every_block(llama_dir: Path) -> None:
    rng = random.Random(1)
    prompts = prompt_set(500, seed=2)
    async with AsyncEngine.from_pretrained(llama_dir, max_num_seqs=64) as engine:
        completed: list[int] = []

        async def run(i: int, cancel_after: int | None) -> None:
            received = 0
            with anyio.CancelScope() as scope:
                async for chunk in engine.stream(prompts[i], greedy(16)):
                    received += len(chunk.token_ids)
                    if cancel_after is not None and received >= cancel_after:
                        scope.cancel()
                        await anyio.sleep(0)
                completed.append(i)

        async def leave_early(i: int, after: int) -> None:
            async for chunk in engine.stream(prompts[i], greedy(16)):
                if chunk.token_ids and after == 0:
                    break
                after -= 1

        uncancelled: set[int] = set()
        async with anyio.create_task_group() as tg:
            for i in range(500):
                kind = rng.random()
                if kind < 0.25:
                    tg.start_soon(run, i, rng.randint(1, 15))
                elif kind < 0.5:
                    tg.start_soon(leave_early, i, rng.randint(0, 10))
                else:
                    uncancelled.add(i)
                    tg.start_soon(run, i, None)
        assert set(completed) == uncancelled
        await assert_settles_idle(engine)  # the last aborts land at the next step boundary
    assert engine._loop is not None and engine._loop.done.is_set(), "the background task has ended"


async def test_abort_by_id_ends_the_stream_with_what_it_had(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        chunks = []
        async for chunk in engine.stream([1, 2, 3], greedy(300), request_id="mine"):
            chunks.append(chunk)
            if len(chunks) == 3:
                engine.abort("mine")
        assert chunks[-1].finish_reason == "abort"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 3
        assert_idle(engine)


async def test_bad_input_fails_before_queueing_and_the_engine_keeps_serving(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir, max_model_len=128) as engine:
        with pytest.raises(InvalidRequestError, match="prompt"):
            engine.stream("")
        with pytest.raises(InvalidRequestError, match="prompt"):
            engine.stream([1, 2, 100_000])
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            engine.stream([1, 2, 3], SamplingParams(max_tokens=200))
        with pytest.raises(InvalidRequestError, match="messages"):
            engine.stream([1], messages=[{"role": "user", "content": "x"}])
        assert engine.stats().num_waiting == 0
        assert (await engine.generate([1, 2, 3], greedy(4))).usage.completion_tokens == 4


async def test_aclose_ends_open_streams_with_engine_closed(llama_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(llama_dir)
    await engine.start()
    errors: list[BaseException] = []

    decoding = anyio.Event()

    async def consume() -> None:
        try:
            async for _ in engine.stream([5, 6], greedy(400)):
                decoding.set()
        except EngineClosedError as exc:
            errors.append(exc)

    with anyio.fail_after(60):  # bounds a stream left hanging by aclose; the test takes well under a second
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await decoding.wait()  # mid-decode for sure (a fixed sleep could land before or after it)
            await engine.aclose()
    assert len(errors) == 1
    with pytest.raises(EngineClosedError):
        engine.stream([1, 2])


async def test_a_failing_step_fails_the_streams_and_marks_the_engine_unhealthy(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        def broken_step() -> list[object]:
            raise RuntimeError("boom")

        engine.core.step = broken_step  # type: ignore[assignment,method-assign]
        with pytest.raises(EngineError, match="boom"):
            await engine.generate([1, 2, 3], greedy(4))
        assert not engine.stats().healthy
        with pytest.raises(EngineError):
            engine.stream([1, 2, 3])


async def test_overload_is_refused_at_submit(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir, max_waiting=2) as engine:
        engine.stream([1], greedy(2))
        engine.stream([2], greedy(2))
        with pytest.raises(EngineOverloadedError, match="max_waiting"):
            engine.stream([3], greedy(2))


class RecordThread(LogitsProcessor):
    """Records the thread each step's logits reach it on (changes nothing)."""

    threads: ClassVar[set[int]] = set()

    def process_logits(self, logits: object) -> None:
        RecordThread.threads.add(threading.get_ident())


@pytest.mark.timing
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_event_loop_stays_responsive_while_64_streams_decode(
    anyio_backend: str, checkpoint_factory: object
) -> None:
    model_dir = checkpoint_factory(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,  # type: ignore[operator]
                                   intermediate_size=512)
    RecordThread.threads = set()
    async with AsyncEngine.from_pretrained(model_dir) as engine:
        lags: list[float] = []
        done = anyio.Event()

        async def ticker() -> None:
            while not done.is_set():
                start = time.perf_counter()
                await anyio.sleep(0.005)
                lags.append(time.perf_counter() - start - 0.005)

        async def run(i: int) -> None:
            params = greedy(32)
            if i == 0:  # one stream also reports which thread the model step runs on
                params = params.model_copy(update={"logits_processors": (RecordThread,)})
            async for _ in engine.stream(prompt_set(64, seed=3)[i], params):
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            async with anyio.create_task_group() as streams:
                for i in range(64):
                    streams.start_soon(run, i)
            done.set()
        # Whatever the machine's speed: the model step never runs on the event loop's thread.
        assert RecordThread.threads and threading.get_ident() not in RecordThread.threads
        lags.sort()
        # The 99th percentile, and never the single largest tick (with ~100 ticks int(0.99 n) is the last):
        # one isolated stall is not asserted (below). The largest here is the last tick, while the loop
        # routes the 64 streams that end on the same step.
        p99 = lags[min(int(0.99 * len(lags)), len(lags) - 2)]
        print(f"ticker lag over {len(lags)} ticks: p50 {lags[len(lags) // 2] * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")
        # Margin: on a 2-core machine p99 was 3-12 ms (other test runs sharing it) and at most
        # 17 ms with four busy processes competing for both cores; 50 ms holds there. A loop
        # that is actually blocked fails it by far: a step run on the loop lags every tick by
        # the whole step (2 ticks in the whole run, ~2 s each), and a 100 ms stall on more than
        # 1 % of the ticks (every 5th step, say) puts p99 at ~100 ms. A single isolated stall is
        # not asserted: under that load the OS alone delays a tick by up to ~300 ms now and then.
        assert p99 < 0.050, f"the event loop lagged {p99 * 1e3:.1f} ms at p99"


async def test_a_slow_consumer_gets_coalesced_chunks_and_holds_nobody_up(llama_dir: Path) -> None:
    """The slow consumer takes one chunk, then stops reading until the fast request has
    finished: no wall-clock bound, so a loaded machine cannot fail it, but an engine that
    waited for consumers would never finish the fast one (the 60 s bound turns that hang
    into a failure; the test takes well under a second)."""
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        fast_done = anyio.Event()
        slow_chunks: list[int] = []

        async def slow() -> None:
            async for chunk in engine.stream([3, 4, 5], greedy(40)):
                slow_chunks.append(len(chunk.token_ids))
                await fast_done.wait()  # a no-op after the first chunk

        async def fast() -> None:
            await engine.generate([6, 7, 8], greedy(40))
            fast_done.set()

        with anyio.move_on_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                tg.start_soon(fast)
        assert fast_done.is_set(), f"the fast stream waited for the slow consumer (which read {slow_chunks})"
        assert sum(slow_chunks) == 40
        # All that arrived while it was not reading comes merged: one chunk, or two if the slow
        # request's last step came after the fast one's.
        assert len(slow_chunks) <= 3, f"deltas waiting for the slow consumer were not merged: {slow_chunks}"


async def test_messages_need_a_chat_template(llama_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    plain = tmp_path / "no-template"
    shutil.copytree(llama_dir, plain)
    config_path = plain / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    async with AsyncEngine.from_pretrained(plain) as engine:
        with pytest.raises(InvalidRequestError, match="chat template"):
            engine.stream(messages=[{"role": "user", "content": "hi"}])
        assert (await engine.generate("hi", greedy(2))).usage.completion_tokens == 2


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
async def test_runs_under_uvloop(llama_dir: Path, anyio_backend: object) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        out = await engine.generate(messages=[{"role": "user", "content": "Hello"}], params=greedy(5))
        assert out.usage.completion_tokens == 5


async def test_start_and_aclose_may_run_in_different_tasks(llama_dir: Path) -> None:
    """As in Jupyter cells or framework lifespans: no task group spans both calls."""
    engine = AsyncEngine.from_pretrained(llama_dir)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.start)
    assert (await engine.generate([1, 2, 3], greedy(3))).usage.completion_tokens == 3
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.aclose)
    assert engine._loop is not None and engine._loop.done.is_set()


async def test_prometheus_export_reads_the_stats(llama_dir: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    async with AsyncEngine.from_pretrained(llama_dir, num_kv_blocks=40) as engine:
        registry = CollectorRegistry()
        engine.register_prometheus(registry)
        await engine.generate([1, 2, 3], greedy(4))
        text = generate_latest(registry).decode()
    assert "kvloom_kv_blocks_total 40.0" in text
    assert "kvloom_healthy 1.0" in text
    assert "kvloom_ttft_p50_seconds" in text


async def test_n_choices_stream_with_their_index_and_match_llm(llama_dir: Path) -> None:
    params = SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=6, ignore_eos=True)
    expected = LLM(llama_dir).generate([[9, 10, 11]], params)[0]
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        per_index: dict[int, list[int]] = {0: [], 1: [], 2: []}
        async for chunk in engine.stream([9, 10, 11], params):
            per_index[chunk.index].extend(chunk.token_ids)
        assert [per_index[i] for i in range(3)] == [c.token_ids for c in expected.choices]
        completion = await engine.generate([9, 10, 11], params)
        assert [c.token_ids for c in completion.choices] == [c.token_ids for c in expected.choices]


async def test_streamed_text_stops_before_a_stop_string(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        full = await engine.generate("Once upon a time", greedy(40))
        stop = full.text[5:9]
        params = SamplingParams(temperature=0.0, max_tokens=40, stop=[stop])
        chunks = [c async for c in engine.stream("Once upon a time", params)]
        assert "".join(c.text for c in chunks) == full.text[: full.text.index(stop)]
        assert chunks[-1].finish_reason == "stop"
        assert_idle(engine)


# ---- wait_idle ---------------------------------------------------------------------------------
class BlockOnCall(LogitsProcessor):
    """Holds the engine thread inside its ``block_on``-th ``process_logits`` call (a step that cannot
    end, whatever the machine's speed) until ``release`` is set."""

    block_on: ClassVar[int] = 3
    blocked: ClassVar[threading.Event] = threading.Event()
    release: ClassVar[threading.Event] = threading.Event()

    def __init__(self) -> None:
        self.calls = 0

    def process_logits(self, logits: object) -> None:
        self.calls += 1
        if self.calls == BlockOnCall.block_on:
            BlockOnCall.blocked.set()
            BlockOnCall.release.wait(60)  # bounded: a failing test never leaves the thread stuck


async def test_wait_idle_refuses_an_engine_that_is_not_running(llama_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(llama_dir)
    with pytest.raises(EngineClosedError, match="not running"):
        await engine.wait_idle()
    async with engine:
        await engine.wait_idle()  # idle from the start: returns at once
        for bad in (0, -1.0, float("nan")):
            with pytest.raises(InvalidRequestError, match="timeout"):
                await engine.wait_idle(timeout=bad)
    with pytest.raises(EngineClosedError, match="not running"):
        await engine.wait_idle()


async def test_wait_idle_returns_once_submitted_requests_have_finished(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        # Submitted and never read while the engine runs them: nothing but the engine's own progress
        # can end them, and wait_idle must not return before it has.
        streams = [engine.stream([3 + i, 4, 5], greedy(8 + 4 * i)) for i in range(3)]
        with pytest.raises(AssertionError, match="streams still open"):
            engine.assert_idle()
        await engine.wait_idle(timeout=60)
        engine.assert_idle()
        assert engine.stats().num_running == engine.stats().num_waiting == 0
        for i, stream in enumerate(streams):
            chunks = [c async for c in stream]  # everything was delivered before the engine went idle
            assert sum(len(c.token_ids) for c in chunks) == 8 + 4 * i and chunks[-1].finish_reason == "length"


async def test_wait_idle_returns_once_aborts_have_freed_their_blocks(llama_dir: Path) -> None:
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        long = engine.stream([1, 2, 3], greedy(500), request_id="long")
        first = await long.__anext__()
        assert first.token_ids
        engine.abort("long")
        with pytest.raises(AssertionError, match="streams still open"):
            engine.assert_idle()  # the abort lands at the next step boundary, not at once
        await engine.wait_idle(timeout=60)
        engine.assert_idle()
        rest = [c async for c in long]
        assert rest[-1].finish_reason == "abort"
        assert sum(len(c.token_ids) for c in [first, *rest]) < 500


async def test_wait_idle_times_out_naming_what_is_in_flight(llama_dir: Path) -> None:
    BlockOnCall.blocked.clear()
    BlockOnCall.release.clear()
    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        params = greedy(6).model_copy(update={"logits_processors": (BlockOnCall,)})
        stream = engine.stream([1, 2, 3], params)
        try:
            await anyio.to_thread.run_sync(BlockOnCall.blocked.wait, 60)
            assert BlockOnCall.blocked.is_set()
            # The third step cannot end while the processor holds it: the engine is certainly busy.
            with pytest.raises(TimeoutError, match=r"not idle after 0\.2s: 1 sequences running .*a step in flight"):
                await engine.wait_idle(timeout=0.2)
        finally:
            BlockOnCall.release.set()
        await engine.wait_idle(timeout=60)
        assert [t for c in [c async for c in stream] for t in c.token_ids] == (
            await engine.generate([1, 2, 3], greedy(6))).token_ids
        engine.assert_idle()


async def test_wait_idle_raises_when_the_engine_closes_or_dies_while_waiting(llama_dir: Path) -> None:
    engine = AsyncEngine.from_pretrained(llama_dir)
    await engine.start()
    errors: list[BaseException] = []
    waiting = anyio.Event()

    async def wait() -> None:
        waiting.set()  # no checkpoint between this and wait_idle's wait: busy, it waits at once
        try:
            await engine.wait_idle()
        except EngineClosedError as exc:
            errors.append(exc)

    long = engine.stream([5, 6], greedy(500))
    await long.__anext__()
    with anyio.fail_after(60):  # a waiter left hanging by aclose fails here
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await waiting.wait()
            await engine.aclose()
    assert len(errors) == 1, "the waiter was woken by the close, with EngineClosedError"

    async with AsyncEngine.from_pretrained(llama_dir) as engine:
        def broken_step() -> list[object]:
            raise RuntimeError("boom")

        engine.core.step = broken_step  # type: ignore[assignment,method-assign]
        with pytest.raises(EngineError, match="boom"):
            await engine.generate([1, 2, 3], greedy(4))
        with pytest.raises(EngineDeadError, match="boom"):
            await engine.wait_idle()

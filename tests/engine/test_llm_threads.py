"""``LLM`` from several threads: the calls are batched together, each gets exactly its own
results, and nothing is left corrupted (two threads once broke it for good with an IndexError)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from kvloom import LLM, SamplingParams
from kvloom.errors import InvalidRequestError
from tests.engine.helpers import greedy, tokens


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(llama_dir, max_model_len=256)


def _in_threads(calls: list[Any]) -> list[Any]:
    """Run each zero-argument callable in its own thread, all released at once; results (or
    the exception each raised) in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return results


def test_threads_get_their_own_tokens_batched_together(llm: LLM) -> None:
    prompts = [[tokens(6 + i, seed=i) for i in range(k, k + 3)] for k in (0, 3, 6, 9)]
    alone = [[c.token_ids for c in llm.generate(p, greedy(24))] for p in prompts]

    most_running = 0
    run = llm.driver.run

    def watching_run(step_input: Any) -> Any:
        nonlocal most_running
        out = run(step_input)
        most_running = max(most_running, out.snapshot.num_running)
        return out

    llm.driver.run = watching_run  # type: ignore[method-assign]
    try:
        results = _in_threads([lambda p=p: llm.generate(p, greedy(24)) for p in prompts])
    finally:
        del llm.driver.run
    for got, want in zip(results, alone, strict=True):
        assert not isinstance(got, BaseException), got
        assert [c.token_ids for c in got] == want
        assert all(c.finish_reason == "length" for c in got)
    assert most_running > 3, "the threads' requests never ran in one step"
    llm.assert_idle()
    # And the engine still serves a plain call afterwards.
    assert [c.token_ids for c in llm.generate(prompts[0], greedy(24))] == alone[0]


class _Explodes:
    """A logits processor factory whose product fails its request on the engine thread."""

    def __call__(self) -> Any:
        raise RuntimeError("boom")


def test_a_failing_call_in_one_thread_leaves_the_others_whole(llm: LLM) -> None:
    good = [tokens(8, seed=1), tokens(9, seed=2)]
    want = [c.token_ids for c in llm.generate(good, greedy(16))]
    bad_params = SamplingParams(max_tokens=16, logits_processors=[_Explodes()])
    results = _in_threads([
        lambda: llm.generate(good, greedy(16)),
        lambda: llm.generate([tokens(7, seed=3), tokens(7, seed=4)], bad_params),
        lambda: llm.generate(good, greedy(16)),
    ])
    assert [c.token_ids for c in results[0]] == want
    assert [c.token_ids for c in results[2]] == want
    assert isinstance(results[1], InvalidRequestError)
    assert "logits_processors" in str(results[1])
    llm.assert_idle()


def test_bad_input_from_one_thread_queues_nothing(llm: LLM) -> None:
    results = _in_threads([
        lambda: llm.generate([[1, 2, 3], [1, 2, 10**6]], greedy(4)),
        lambda: llm.generate([[1, 2, 3]], greedy(4)),
    ])
    assert isinstance(results[0], InvalidRequestError)
    assert [len(c.token_ids) for c in results[1]] == [4]
    llm.assert_idle()


def test_argument_types_are_checked_as_the_async_engine_checks_them(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="adapter"):
        llm.generate([1, 2], greedy(2), adapter=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="params"):
        llm.generate([[1, 2], [3]], [greedy(2)])
    with pytest.raises(InvalidRequestError, match="params"):
        llm.generate([1, 2], "greedy")  # type: ignore[arg-type]
    llm.assert_idle()

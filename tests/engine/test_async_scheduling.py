"""Scheduling one step ahead (``async_scheduling=True``) changes when the host works, never what
comes out: the same tokens (and logprobs, to float32 noise) as one step at a time, on workloads that chunk prefills,
preempt, fork ``n`` choices, stop on tokens, strings and lengths, and abort mid-flight.

On CPU the step ahead runs at once (the forward is synchronous), so these tests check the data
flow that makes overlap possible on CUDA: the next step's inputs take the previous step's
sampled tokens from the device, the scheduler counts tokens it has not seen yet, and whatever
ends while a step is in flight drops that step's token and frees its blocks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
import torch

from kvloom import LLM, AsyncEngine, Completion, SamplingParams
from kvloom.config import EngineConfig
from kvloom.engine.core import EngineCore
from kvloom.structured.logits_processor import LogitsProcessor
from tests.engine.helpers import assert_settles_idle

SMALL_STEPS: dict[str, Any] = {"max_model_len": 256, "max_num_batched_tokens": 48, "block_size": 4}


def _run(model: Path, async_scheduling: bool, prompts: list[list[int]], params: list[SamplingParams],
         **config: Any) -> tuple[list[Completion], EngineCore]:
    llm = LLM(model, async_scheduling=async_scheduling, **config)
    try:
        out = llm.generate(prompts, params)
        llm.core.assert_idle()
        return out, llm.core
    finally:
        llm.close()


def _choices(out: list[Completion]) -> list[list[tuple[list[int], str | None]]]:
    """Each choice's tokens and finish reason; logprobs are compared by ``_assert_same_logprobs``."""
    return [[(c.token_ids, c.finish_reason) for c in o.choices] for o in out]


def _assert_same_logprobs(got: list[Completion], want: list[Completion]) -> None:
    """Equal to float32 noise: the two runs batch the requests differently (admissions wait a step
    for the one in flight), and a GEMM may sum in another order for another batch size."""
    for g, w in zip(got, want, strict=True):
        for gc, wc in zip(g.choices, w.choices, strict=True):
            assert (gc.logprobs is None) == (wc.logprobs is None)
            for a, b in zip(gc.logprobs or [], wc.logprobs or [], strict=True):
                assert (a.token_id, a.rank, [t for t, _ in a.top]) == (b.token_id, b.rank, [t for t, _ in b.top])
                assert abs(a.logprob - b.logprob) < 1e-5


def _workload(seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(5, 500) for _ in range(rng.randrange(2, 100))] for _ in range(14)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 28), ignore_eos=True,
                             logprobs=2 if i % 3 == 0 else None) for i in range(14)]
    params[4] = SamplingParams(temperature=0.9, seed=11, max_tokens=20, ignore_eos=True, n=3)
    params[7] = SamplingParams(temperature=1.2, seed=5, top_p=0.8, top_k=40, max_tokens=18, ignore_eos=True)
    params[9] = SamplingParams(temperature=0.0, max_tokens=24, min_tokens=6, stop_token_ids=[prompts[9][0]])
    return prompts, params


@pytest.mark.parametrize("pool", [None, 44], ids=["roomy", "preempting"])
def test_same_tokens_and_logprobs_as_one_step_at_a_time(llama_dir: Path, pool: int | None) -> None:
    prompts, params = _workload(seed=0)
    config = SMALL_STEPS | ({"num_kv_blocks": pool} if pool is not None else {})
    sync, sync_core = _run(llama_dir, False, prompts, params, **config)
    ahead, ahead_core = _run(llama_dir, True, prompts, params, **config)
    assert _choices(ahead) == _choices(sync)
    _assert_same_logprobs(ahead, sync)
    assert any(c.logprobs for o in ahead for c in o.choices)
    assert sync_core.num_steps_ahead == 0
    assert ahead_core.num_steps_ahead > 20
    if pool is not None:
        assert sync_core.num_preemptions > 0 and ahead_core.num_preemptions > 0, "the pool is meant to be tight"


def test_stops_found_after_the_step_ahead_drop_its_token(llama_dir: Path) -> None:
    """A stop token or string is seen only when its step is read back, after the next step was
    launched: that step's token for the request is dropped, and its blocks freed."""
    prompt = [11, 42, 7, 99, 123, 5, 77]
    free = _run(llama_dir, False, [prompt], [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)])[0]
    tokens, text = free[0].token_ids, free[0].text
    stop_tok = tokens[5]
    stop_str = text[len(text) // 2: len(text) // 2 + 3]
    params = [
        SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_tok]),
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop_str]),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
    ]
    sync = _run(llama_dir, False, [prompt] * 3, params)[0]
    ahead, core = _run(llama_dir, True, [prompt] * 3, params)
    assert _choices(ahead) == _choices(sync)
    assert [c.text for c in ahead] == [c.text for c in sync]
    assert ahead[0].token_ids == tokens[: tokens.index(stop_tok) + 1] and ahead[0].finish_reason == "stop"
    assert ahead[1].finish_reason == "stop" and stop_str not in ahead[1].text
    assert len(ahead[2].token_ids) == 1
    assert core.num_steps_ahead > 0


def test_an_id_reused_while_its_old_request_is_in_flight_gets_only_its_own_tokens(llama_dir: Path) -> None:
    from kvloom.scheduler.request import Request

    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    core = EngineCore(EngineConfig.from_kwargs(llama_dir, async_scheduling=True))
    assert core.async_scheduling
    core.add_request(Request("a", [5, 6, 7, 8], greedy, frozenset()))
    first = core.step().outputs  # the prefill's step, read back; its first decode is in flight
    assert [o.new_token_ids for o in first] and core.num_steps_ahead == 1
    core.finish_requests(["a"], "abort")
    core.add_request(Request("a", [300, 301, 302], greedy, frozenset()))
    got: list[int] = []
    while core.has_unfinished():
        got += [t for o in core.step().outputs for t in o.new_token_ids]
    core.assert_idle()
    reference = _run(llama_dir, False, [[300, 301, 302]], [greedy])[0][0].token_ids
    assert got == reference


class NoRepeats(LogitsProcessor):
    """A user processor whose mask follows every token it accepted: it bans them all. It records the
    order of its calls: each step's ``process_logits`` must come after the previous step's accept."""

    calls: ClassVar[list[str]] = []

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.order: list[str] = []
        NoRepeats.calls = self.order

    def process_logits(self, logits: torch.Tensor) -> None:
        self.order.append("process")
        logits[self.seen] = float("-inf")

    def accept_token(self, token_id: int) -> bool:
        self.order.append("accept")
        self.seen.append(token_id)
        return True


def test_steps_that_sample_from_host_tokens_launch_their_sampling_after_the_step_before(llama_dir: Path) -> None:
    """Penalties and logits processors read the tokens so far on the host: the step ahead runs its
    forward at once and samples once the step before it is read back, with the same tokens."""
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for special in (plain.model_copy(update={"repetition_penalty": 1.3}),
                    plain.model_copy(update={"presence_penalty": 0.5, "frequency_penalty": 0.4}),
                    plain.model_copy(update={"logits_processors": [NoRepeats]})):
        sync = _run(llama_dir, False, prompts, [plain, special, special])[0]
        ahead, core = _run(llama_dir, True, prompts, [plain, special, special])
        assert _choices(ahead) == _choices(sync)
        assert core.num_steps_ahead > 5
    assert all(len(set(c.token_ids)) == len(c.token_ids) for c in ahead[1:]), "no token repeats"
    assert NoRepeats.calls == ["process", "accept"] * 12, "a mask was built before the last token was accepted"


class EndsAfterThree(LogitsProcessor):
    """Ends its sequence after three tokens, and records any call made to it after that."""

    late_calls: ClassVar[list[str]] = []

    def __init__(self) -> None:
        self.count = 0

    def process_logits(self, logits: torch.Tensor) -> None:
        if self.is_terminated():
            EndsAfterThree.late_calls.append("process_logits")

    def accept_token(self, token_id: int) -> bool:
        if self.is_terminated():
            EndsAfterThree.late_calls.append("accept_token")
        self.count += 1
        return True

    def is_terminated(self) -> bool:
        return self.count >= 3


def test_a_sequence_its_processor_ends_is_never_processed_again(llama_dir: Path) -> None:
    """Its step ahead was launched before the end was known: that step samples its row without the
    processor and drops the token."""
    EndsAfterThree.late_calls = []
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logits_processors=[EndsAfterThree])
    plain = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    sync = _run(llama_dir, False, [[5, 6, 7], [8, 9]], [params, plain])[0]
    ahead, core = _run(llama_dir, True, [[5, 6, 7], [8, 9]], [params, plain])
    assert _choices(ahead) == _choices(sync)
    assert len(ahead[0].token_ids) == 3 and ahead[0].finish_reason == "stop"
    assert core.num_steps_ahead > 5
    assert EndsAfterThree.late_calls == []


def test_grammars_validate_and_match_one_step_at_a_time(llama_dir: Path) -> None:
    """A JSON schema sampled at temperature 1 (seeded) and a choice grammar that ends its request
    while the next step is already launched (that row is sampled without its grammar and dropped)."""
    schema = {"type": "object", "properties": {"id": {"type": "integer"}, "tag": {"enum": ["a", "b", "c"]}},
              "required": ["id", "tag"], "additionalProperties": False}
    params = [
        SamplingParams(temperature=1.0, seed=3, max_tokens=60, response_format={"type": "json_schema",
                                                                               "json_schema": schema}),
        SamplingParams(temperature=1.0, seed=4, max_tokens=20, response_format={"type": "choice",
                                                                               "choice": ["aa", "bb"]}),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
    ]
    prompts = [[20, 21, 22], [23, 24], [25, 26, 27, 28]]
    sync = _run(llama_dir, False, prompts, params, max_model_len=256)[0]
    ahead, core = _run(llama_dir, True, prompts, params, max_model_len=256)
    assert _choices(ahead) == _choices(sync)
    assert [c.text for c in ahead] == [c.text for c in sync]
    assert core.num_steps_ahead > 10
    assert ahead[1].text in ("aa", "bb") and ahead[1].finish_reason == "stop"
    if ahead[0].finish_reason == "stop":
        document = json.loads(ahead[0].text)
        assert set(document) == {"id", "tag"} and document["tag"] in ("a", "b", "c")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_concurrent_streams_with_cancellations_and_preemption(llama_dir: Path) -> None:
    """Through ``AsyncEngine``: 80 streams on a pool far too small for them (preemption), a quarter
    cancelled part-way while their next step is in flight; the rest equal each request alone, and
    every block comes back."""
    rng = random.Random(3)
    prompts = [[rng.randrange(5, 512) for _ in range(rng.randint(1, 50))] for _ in range(80)]
    lengths = [1 + i % 11 for i in range(80)]
    cancel_after = {i: rng.randint(1, 4) for i in range(80) if rng.random() < 0.25 and lengths[i] > 4}
    greedy = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    alone = [c.token_ids for c in _run(llama_dir, False, prompts, greedy)[0]]
    async with AsyncEngine.from_pretrained(llama_dir, async_scheduling=True, num_kv_blocks=12,
                                           max_num_batched_tokens=64) as engine:
        assert engine.stats().async_scheduling
        results: dict[int, list[int]] = {}

        async def run(i: int) -> None:
            got: list[int] = []
            async for chunk in engine.stream(prompts[i], greedy[i]):
                got += chunk.token_ids
                if i in cancel_after and len(got) >= cancel_after[i]:
                    break
            results[i] = got

        async with anyio.create_task_group() as tg:
            for i in range(80):
                tg.start_soon(run, i)
        for i in range(80):
            expected = alone[i][: len(results[i])] if i in cancel_after else alone[i]
            assert results[i] == expected, i
        assert engine.stats().num_preemptions > 0
        await assert_settles_idle(engine)


def test_the_default_is_on_for_cuda_only(llama_dir: Path) -> None:
    llm = LLM(llama_dir)
    try:
        assert llm.core.async_scheduling is torch.cuda.is_available()
    finally:
        llm.close()

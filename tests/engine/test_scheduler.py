"""The scheduler alone, with a fake runner: budgets, chunked prefill, preemption, stops."""

from __future__ import annotations

from kvloom.config import SchedulerConfig
from kvloom.kv_cache.manager import KVCacheManager
from kvloom.params import SamplingParams
from kvloom.scheduler.output import SampledTokens, SchedulerOutput
from kvloom.scheduler.request import Request
from kvloom.scheduler.scheduler import Scheduler

EOS = 0


def make(num_blocks: int = 64, block_size: int = 4, caching: bool = True, **cfg: int | bool) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, watermark=0.0, enable_caching=caching)
    return Scheduler(SchedulerConfig(**cfg), kv, max_model_len=1024)  # type: ignore[arg-type]


def req(rid: str, prompt_len: int, max_tokens: int = 4, priority: int = 0, t: float = 0.0) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(rid, list(range(1, prompt_len + 1)), params, frozenset({EOS}), priority=priority, arrival_time=t)


def fake_step(s: Scheduler, token: int = 7) -> SchedulerOutput:
    """Schedule, then 'sample' ``token`` for every request whose known tokens are all computed."""
    out = s.schedule()
    sampled = [
        rid for rid, n in out.num_scheduled_tokens.items()
        if s.requests[rid].num_computed_tokens + n == s.requests[rid].num_tokens
    ]
    s.update(out, SampledTokens(sampled, [token] * len(sampled)))
    return out


def test_long_prompt_is_chunked_under_the_token_budget_and_mixed_with_decodes() -> None:
    s = make(max_num_batched_tokens=8)
    s.add_request(req("short", 3))
    fake_step(s)  # short prefilled, first token sampled
    s.add_request(req("long", 20))
    out = fake_step(s)
    assert out.num_scheduled_tokens == {"short": 1, "long": 7}
    out = fake_step(s)
    assert out.num_scheduled_tokens == {"short": 1, "long": 7}
    assert s.requests["long"].num_output_tokens == 0
    out = fake_step(s)
    assert out.num_scheduled_tokens["long"] == 6
    assert s.requests["long"].num_output_tokens == 1


def test_finishes_on_max_tokens_and_on_eos_and_frees_blocks() -> None:
    s = make()
    s.add_request(req("a", 5, max_tokens=3))
    while s.has_unfinished():
        fake_step(s)
    s.add_request(req("b", 5, max_tokens=10))
    fake_step(s, token=EOS)
    assert not s.has_unfinished()
    s.kv.check_all_free()


def test_preemption_frees_the_least_important_and_recomputes_it_later() -> None:
    # 6 blocks of 4 tokens: two requests of 8-token prompts fit (4 blocks) but cannot both grow to 16.
    s = make(num_blocks=6, block_size=4)
    s.add_request(req("first", 8, max_tokens=8, t=0.0))
    s.add_request(req("second", 8, max_tokens=8, t=1.0))
    first, second = s.requests["first"], s.requests["second"]
    readmitted_at = None
    for step in range(100):
        if not s.has_unfinished():
            break
        out = fake_step(s)
        if second.num_preemptions and readmitted_at is None and "second" in out.num_scheduled_tokens:
            readmitted_at = step  # recomputed from its cached prefix
    assert first.num_preemptions == 0 and second.num_preemptions >= 1, "the later arrival is the victim"
    assert readmitted_at is not None
    assert first.num_output_tokens == second.num_output_tokens == 8
    assert not s.has_unfinished()
    s.kv.check_all_free()


def test_a_preempted_request_waits_behind_more_important_waiting_ones() -> None:
    """Defect 5: the preempted request used to go to the head of the queue (``appendleft``),
    ahead of a more important request already waiting."""
    s = make(num_blocks=6, block_size=4, max_num_seqs=2)
    s.add_request(req("a", 8, max_tokens=12, priority=0, t=0.0))
    s.add_request(req("b", 8, max_tokens=12, priority=5, t=1.0))
    assert list(fake_step(s).num_scheduled_tokens) == ["a", "b"]
    s.add_request(req("c", 8, max_tokens=12, priority=0, t=2.0))  # no seat: max_num_seqs=2
    for _ in range(50):
        if s.requests["b"].num_preemptions:
            break
        out = fake_step(s)
        assert "c" not in out.num_scheduled_tokens
    assert s.requests["a"].num_preemptions == 0, "KV pressure evicts the low-priority request"
    assert [r.request_id for r in s.waiting] == ["c", "b"]
    out = fake_step(s)
    assert "c" in out.num_scheduled_tokens and "b" not in out.num_scheduled_tokens, "c takes the freed seat"
    for _ in range(200):
        if not s.has_unfinished():
            break
        fake_step(s)
    assert not s.has_unfinished()
    s.kv.check_all_free()


def test_chunked_prefill_off_still_recomputes_a_preempted_request_longer_than_the_budget() -> None:
    """A prompt must fit one step with chunked prefill off, but a preempted request recomputes
    its prompt and outputs: refusing to chunk that would wait forever."""
    # No prefix caching: the recompute must cover the whole request, not a cached tail.
    s = make(num_blocks=6, block_size=4, caching=False, max_num_batched_tokens=8, enable_chunked_prefill=False)
    s.add_request(req("first", 6, max_tokens=10, t=0.0))
    s.add_request(req("second", 6, max_tokens=10, t=1.0))
    for _ in range(200):
        if not s.has_unfinished():
            break
        fake_step(s)
    assert not s.has_unfinished(), "a preempted request longer than max_num_batched_tokens never resumed"
    s.kv.check_all_free()


def test_priority_orders_admission() -> None:
    s = make(max_num_seqs=1)
    s.add_request(req("low", 3, priority=5, t=0.0))
    s.add_request(req("high", 3, priority=-1, t=1.0))
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["high"]


def test_finish_requests_frees_blocks_and_tells_the_runner() -> None:
    s = make()
    s.add_request(req("a", 10))
    fake_step(s)
    s.finish_requests(["a"], "abort")
    assert not s.has_unfinished()
    s.kv.check_all_free()
    assert s.schedule().finished_req_ids == {"a"}


def test_a_lone_request_as_large_as_the_pool_starts_despite_the_watermark() -> None:
    kv = KVCacheManager(200, 4, watermark=0.05)  # 10 blocks kept free for running requests to grow
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=1024), kv, max_model_len=1024)
    s.add_request(req("big", 796, max_tokens=4))  # 800 tokens: all 200 blocks
    steps = 0
    while s.has_unfinished():
        fake_step(s)
        steps += 1
        assert steps < 10, "with nothing running, the watermark must not keep it waiting"
    s.kv.check_all_free()

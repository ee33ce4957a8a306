"""The scheduler alone, with a fake runner: budgets, chunked prefill, preemption, stops."""

from __future__ import annotations

from kvloom.config import SchedulerConfig
from kvloom.kv_cache.manager import KVCacheManager
from kvloom.params import SamplingParams
from kvloom.scheduler.output import SampledTokens, SchedulerOutput
from kvloom.scheduler.request import Request
from kvloom.scheduler.scheduler import Scheduler

EOS = 0


def make(num_blocks: int = 64, block_size: int = 4, **cfg: int | bool) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, watermark=0.0)
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
    preempted = False
    for _ in range(100):
        if not s.has_unfinished():
            break
        fake_step(s)
        if "second" in s.requests and s.requests["second"].num_preemptions:
            preempted = True
    assert preempted
    assert not s.has_unfinished()
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

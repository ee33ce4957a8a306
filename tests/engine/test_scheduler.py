"""The scheduler alone, with a fake runner: budgets, chunked prefill, preemption, stops.

The fake runner samples a token that depends on the whole sequence so far (``next_token``), as a
model's does: a request ends with exactly the tokens it would get alone, in order, once each,
however it was chunked, preempted and recomputed, and with the finish reason its stop gives.
"""

from __future__ import annotations

from kvloom.config import SchedulerConfig
from kvloom.kv_cache.manager import KVCacheManager
from kvloom.outputs import FinishReason
from kvloom.params import SamplingParams
from kvloom.scheduler.output import SampledTokens, SchedulerOutput
from kvloom.scheduler.request import Request
from kvloom.scheduler.scheduler import Scheduler

EOS = 0


def make(num_blocks: int = 64, block_size: int = 4, caching: bool = True, **cfg: int | bool) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, watermark=0.0, enable_caching=caching)
    return Scheduler(SchedulerConfig(**cfg), kv, max_model_len=1024)  # type: ignore[arg-type]


def prompt(prompt_len: int) -> list[int]:
    return list(range(1, prompt_len + 1))


def req(rid: str, prompt_len: int, max_tokens: int = 4, priority: int = 0, t: float = 0.0) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(rid, prompt(prompt_len), params, frozenset({EOS}), priority=priority, arrival_time=t)


def next_token(token_ids: list[int]) -> int:
    """The fake model: a function of every token so far (order included), never ``EOS``."""
    return 1 + sum((i + 1) * t for i, t in enumerate(token_ids)) % 97


def alone(prompt_len: int, max_tokens: int) -> list[int]:
    """The tokens a request of ``prompt(prompt_len)`` gets running alone: ``max_tokens`` of them."""
    tokens = prompt(prompt_len)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[prompt_len:]


# Every request the fake steps ran: what the scheduler reported for it, as the engine would see it.
reported_tokens: dict[str, list[int]] = {}
reported_finish: dict[str, FinishReason] = {}


def fake_step(s: Scheduler, token: int | None = None) -> SchedulerOutput:
    """Schedule, then 'sample' for every request whose known tokens are all computed: ``token`` if
    given, else ``next_token`` of its sequence. Records what ``update`` reports per request, and
    checks nothing is reported for a request after its finish."""
    out = s.schedule()
    sampled = [
        rid for rid, n in out.num_scheduled_tokens.items()
        if s.requests[rid].num_computed_tokens + n == s.requests[rid].num_tokens
    ]
    tokens = [token if token is not None else next_token(s.requests[rid].token_ids) for rid in sampled]
    for output in s.update(out, SampledTokens(sampled, tokens)):
        assert output.req_id not in reported_finish, f"{output.req_id} reported after it finished"
        reported_tokens.setdefault(output.req_id, []).extend(output.new_token_ids)
        if output.finish_reason is not None:
            reported_finish[output.req_id] = output.finish_reason
    return out


def assert_finished(request: Request, tokens: list[int], reason: FinishReason) -> None:
    """``request`` ended with exactly ``tokens`` for ``reason``, and the runner's reports agree."""
    assert request.is_finished
    assert request.output_token_ids == tokens, (request.request_id, request.output_token_ids, tokens)
    assert request.finish_reason == reason
    assert reported_tokens.get(request.request_id, []) == tokens, request.request_id
    assert reported_finish.get(request.request_id) == reason


def setup_function() -> None:
    reported_tokens.clear()
    reported_finish.clear()


def test_long_prompt_is_chunked_under_the_token_budget_and_mixed_with_decodes() -> None:
    s = make(max_num_batched_tokens=8)
    short, long = req("short", 3), req("long", 20)
    s.add_request(short)
    fake_step(s)  # short prefilled, first token sampled
    s.add_request(long)
    out = fake_step(s)
    assert out.num_scheduled_tokens == {"short": 1, "long": 7}
    out = fake_step(s)
    assert out.num_scheduled_tokens == {"short": 1, "long": 7}
    assert long.num_output_tokens == 0
    out = fake_step(s)
    assert out.num_scheduled_tokens["long"] == 6
    assert long.num_output_tokens == 1
    while s.has_unfinished():
        fake_step(s)
    assert_finished(short, alone(3, 4), "length")
    assert_finished(long, alone(20, 4), "length")
    s.kv.check_all_free()


def test_finishes_on_max_tokens_and_on_eos_and_frees_blocks() -> None:
    s = make()
    a, b = req("a", 5, max_tokens=3), req("b", 5, max_tokens=10)
    s.add_request(a)
    while s.has_unfinished():
        fake_step(s)
    assert_finished(a, alone(5, 3), "length")
    s.add_request(b)
    fake_step(s, token=EOS)
    assert not s.has_unfinished()
    assert_finished(b, [EOS], "stop")  # EOS is its first token: it ends there, EOS included
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
    assert not s.has_unfinished()
    # Recomputed from its prompt and outputs, the victim goes on where it was: same tokens as alone.
    assert_finished(first, alone(8, 8), "length")
    assert_finished(second, alone(8, 8), "length")
    s.kv.check_all_free()


def test_a_preempted_request_waits_behind_more_important_waiting_ones() -> None:
    """Defect 5: the preempted request used to go to the head of the queue (``appendleft``),
    ahead of a more important request already waiting."""
    s = make(num_blocks=6, block_size=4, max_num_seqs=2)
    a = req("a", 8, max_tokens=12, priority=0, t=0.0)
    b = req("b", 8, max_tokens=12, priority=5, t=1.0)
    c = req("c", 8, max_tokens=12, priority=0, t=2.0)
    s.add_request(a)
    s.add_request(b)
    assert list(fake_step(s).num_scheduled_tokens) == ["a", "b"]
    s.add_request(c)  # no seat: max_num_seqs=2
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
    for request in (a, b, c):
        assert_finished(request, alone(8, 12), "length")
    s.kv.check_all_free()


def test_chunked_prefill_off_still_recomputes_a_preempted_request_longer_than_the_budget() -> None:
    """A prompt must fit one step with chunked prefill off, but a preempted request recomputes
    its prompt and outputs: refusing to chunk that would wait forever."""
    # No prefix caching: the recompute must cover the whole request, not a cached tail.
    s = make(num_blocks=6, block_size=4, caching=False, max_num_batched_tokens=8, enable_chunked_prefill=False)
    first, second = req("first", 6, max_tokens=10, t=0.0), req("second", 6, max_tokens=10, t=1.0)
    s.add_request(first)
    s.add_request(second)
    for _ in range(200):
        if not s.has_unfinished():
            break
        fake_step(s)
    assert not s.has_unfinished(), "a preempted request longer than max_num_batched_tokens never resumed"
    assert second.num_preemptions >= 1, "the case this test is about: a recompute longer than the budget"
    assert_finished(first, alone(6, 10), "length")
    assert_finished(second, alone(6, 10), "length")
    s.kv.check_all_free()


def test_priority_orders_admission() -> None:
    s = make(max_num_seqs=1)
    s.add_request(req("low", 3, priority=5, t=0.0))
    s.add_request(req("high", 3, priority=-1, t=1.0))
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["high"]


def test_finish_requests_frees_blocks_and_tells_the_runner() -> None:
    s = make()
    a = req("a", 10)
    s.add_request(a)
    fake_step(s)
    assert s.finish_requests(["a"], "abort") == [a]
    assert not s.has_unfinished()
    s.kv.check_all_free()
    assert s.schedule().finished_req_ids == {"a"}
    # It keeps the token it had (the engine reports the abort itself: update never saw it).
    assert a.is_finished and a.finish_reason == "abort" and a.output_token_ids == alone(10, 1)
    assert reported_tokens == {"a": alone(10, 1)} and reported_finish == {}


def test_a_lone_request_as_large_as_the_pool_starts_despite_the_watermark() -> None:
    kv = KVCacheManager(200, 4, watermark=0.05)  # 10 blocks kept free for running requests to grow
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=1024), kv, max_model_len=1024)
    big = req("big", 796, max_tokens=4)
    s.add_request(big)  # 800 tokens: all 200 blocks
    steps = 0
    while s.has_unfinished():
        fake_step(s)
        steps += 1
        assert steps < 10, "with nothing running, the watermark must not keep it waiting"
    assert_finished(big, alone(796, 4), "length")
    s.kv.check_all_free()

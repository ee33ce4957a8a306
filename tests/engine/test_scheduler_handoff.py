"""What the scheduler hands over, as data: the runner gets a request's processors once (they
move, the scheduler keeps none), and every ``schedule``/``set_pinned_loras`` names the waiting
requests that can never run, without the engine reading any scheduler attribute."""

from __future__ import annotations

from pathlib import Path

import torch

from kvloom.config import SchedulerConfig
from kvloom.kv_cache.manager import KVCacheManager
from kvloom.lora.adapter import LoRAAdapter
from kvloom.params import SamplingParams
from kvloom.scheduler.output import SampledTokens, SchedulerOutput, Unrunnable
from kvloom.scheduler.request import Request
from kvloom.scheduler.scheduler import Scheduler
from kvloom.structured.logits_processor import LogitsProcessor

BLOCK = 4


class Banned(LogitsProcessor):
    def process_logits(self, logits: torch.Tensor) -> None:
        logits[0] = float("-inf")


def make(num_blocks: int, max_loras: int = 1, **cfg: int | bool) -> Scheduler:
    kv = KVCacheManager(num_blocks, BLOCK, watermark=0.0, enable_caching=True)
    return Scheduler(SchedulerConfig(**cfg), kv, max_model_len=1024, max_loras=max_loras)  # type: ignore[arg-type]


def request(rid: str, prompt: list[int], max_tokens: int = 2, **kwargs: object) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return Request(rid, prompt, params, frozenset(), **kwargs)  # type: ignore[arg-type]


def step(s: Scheduler) -> SchedulerOutput:
    """Schedule and 'sample' token 7 for every request that reached its last known token."""
    out = s.schedule()
    sampled = [rid for rid, n in out.num_scheduled_tokens.items()
               if s.requests[rid].num_computed_tokens + n == s.requests[rid].num_tokens]
    s.update(out, SampledTokens(sampled, [7] * len(sampled)))
    return out


def adapter(name: str) -> LoRAAdapter:
    return LoRAAdapter(Path(name), f"hash-{name}", 1, {})


def test_processors_move_to_the_runner_once_and_preemption_keeps_them_there() -> None:
    s = make(num_blocks=4, max_num_batched_tokens=64)  # 16 token slots
    mine = [Banned()]
    low = request("low", list(range(1, 8)), max_tokens=6, processors=mine, priority=1)
    s.add_request(low)
    first = step(s)
    assert [n.req_id for n in first.new_reqs] == ["low"]
    assert first.new_reqs[0].processors is mine and first.new_reqs[0].processors[0] is mine[0]
    assert low.processors == [], "the scheduler keeps no reference to processors it handed over"
    # A more important request grows into the pool: "low" is preempted, then resumes as cached data only.
    s.add_request(request("high", list(range(20, 24)), max_tokens=6))
    seen_new: list[str] = []
    resumed = False
    while s.has_unfinished():
        out = step(s)
        seen_new += [n.req_id for n in out.new_reqs]
        resumed |= any(c.req_id == "low" and c.resumed for c in out.cached_reqs)
    assert low.num_preemptions > 0 and resumed
    assert seen_new == ["high"], "a request reaches the runner as new exactly once"


def test_a_request_that_cannot_start_beside_pinned_prefixes_is_reported_by_each_schedule() -> None:
    s = make(num_blocks=4, max_num_batched_tokens=64)
    s.add_request(request("handle", list(range(1, 9)), max_tokens=1, pin_prefix=True))
    out = s.schedule()
    [done] = s.update(out, SampledTokens(["handle"], [7]))
    assert done.pinned_block_ids is not None and len(done.pinned_block_ids) == 2  # 2 of the 4 blocks
    s.add_request(request("big", list(range(100, 112)), max_tokens=2))  # 3 blocks for its prompt alone
    for _ in range(2):  # reported by every schedule while it holds, not once and then forgotten
        out = s.schedule()
        assert out.is_empty and out.unrunnable == {"big": Unrunnable.BESIDE_PINNED_PREFIXES}
        assert [r.request_id for r in s.waiting] == ["big"], "the engine, not the scheduler, ends it"
    s.kv.unpin(done.pinned_block_ids)
    out = step(s)
    assert out.num_scheduled_tokens == {"big": 12} and out.unrunnable == {}


def test_pinning_every_adapter_slot_names_the_waiting_requests_that_can_never_run() -> None:
    s = make(num_blocks=16, max_loras=1)
    s.add_request(request("on-a", [1, 2, 3], lora=adapter("a")))
    s.add_request(request("base", [4, 5, 6]))
    assert s.set_pinned_loras({"hash-b"}) == {"on-a": Unrunnable.ADAPTER_SLOTS_PINNED}
    assert s.set_pinned_loras({"hash-a"}) == {}
    assert s.set_pinned_loras(set()) == {}

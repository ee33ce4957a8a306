"""The scheduler under random arrivals, priorities, aborts and pool sizes (hypothesis, stateful),
driven by a fake runner that samples one token per request whose known tokens are computed.

After every step: no more tokens than ``max_num_batched_tokens`` and no more running requests
than ``max_num_seqs`` were scheduled, every scheduled request got at least one token, and the
KV pool's invariants hold. At the end, with no new arrivals, every request finishes within a
bound (nothing starves, nothing deadlocks) and the pool is entirely free (``check_all_free``).
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvloom.config import SchedulerConfig
from kvloom.kv_cache.manager import KVCacheManager
from kvloom.params import SamplingParams
from kvloom.scheduler.output import SampledTokens
from kvloom.scheduler.request import Request
from kvloom.scheduler.scheduler import Scheduler
from tests.fakes import state_machine_settings

EOS = 0
BLOCK_SIZE = 4


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s: Scheduler | None = None
        self.next_id = 0
        self.clock = 0.0
        self.outputs: dict[str, int] = {}
        self.max_tokens: dict[str, int] = {}
        self.finished: set[str] = set()

    @initialize(num_blocks=st.integers(8, 40), budget=st.integers(4, 64), max_seqs=st.integers(1, 8),
                chunked=st.booleans(), caching=st.booleans())
    def build(self, num_blocks: int, budget: int, max_seqs: int, chunked: bool, caching: bool) -> None:
        kv = KVCacheManager(num_blocks, BLOCK_SIZE, enable_caching=caching)
        config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                                 enable_chunked_prefill=chunked)
        self.s = Scheduler(config, kv, max_model_len=1024)

    @property
    def sched(self) -> Scheduler:
        assert self.s is not None
        return self.s

    @rule(prompt=st.lists(st.integers(1, 5), min_size=1, max_size=40), max_tokens=st.integers(1, 12),
          priority=st.integers(0, 2))
    def arrive(self, prompt: list[int], max_tokens: int, priority: int) -> None:
        s = self.sched
        # What the engine refuses at submit: a request that could never fit in the pool, or (with
        # chunked prefill off) a prompt over the token budget.
        if s.kv.blocks_needed(len(prompt) + max_tokens) > s.kv.num_blocks - s.kv.watermark_blocks:
            return
        if not s.config.enable_chunked_prefill and len(prompt) > s.config.max_num_batched_tokens:
            return
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.clock += 1.0
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        s.add_request(Request(rid, list(prompt), params, frozenset({EOS}), priority=priority, arrival_time=self.clock))
        self.outputs[rid] = 0
        self.max_tokens[rid] = max_tokens

    @precondition(lambda self: self.s is not None and bool(self.s.requests))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
        self.sched.finish_requests([rid], "abort")
        self.finished.add(rid)

    @rule(eos=st.booleans())
    def step(self, eos: bool) -> None:
        s = self.sched
        out = s.schedule()
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        assert out.total_num_scheduled_tokens <= s.config.max_num_batched_tokens
        assert all(n >= 1 for n in out.num_scheduled_tokens.values())
        assert len(s.running) <= s.config.max_num_seqs
        sampled = [rid for rid, n in out.num_scheduled_tokens.items()
                   if s.requests[rid].num_computed_tokens + n == s.requests[rid].num_tokens]
        token = EOS if eos and sampled else 7
        for output in s.update(out, SampledTokens(sampled, [token] * len(sampled))):
            self.outputs[output.req_id] += len(output.new_token_ids)
            if output.finish_reason is not None:
                self.finished.add(output.req_id)

    @invariant()
    def pool_is_consistent(self) -> None:
        if self.s is None:
            return
        self.s.kv.pool.check_invariants()
        for rid, n in self.outputs.items():
            assert n <= self.max_tokens[rid], f"{rid} generated {n} > max_tokens {self.max_tokens[rid]}"

    def has_work(self) -> bool:
        """Requests left, or (a machine that schedules ahead) a step in flight."""
        return self.sched.has_unfinished()

    def teardown(self) -> None:
        if self.s is None:
            return
        s = self.s
        # Every request still in flight must finish: each needs at most its prompt plus outputs
        # in tokens (recomputed after each preemption), so this bound is generous.
        bound = 50 + 4 * sum(len(r.token_ids) + self.max_tokens[r.request_id] for r in s.requests.values())
        steps = 0
        while self.has_work():
            self.step(eos=False)
            steps += 1
            assert steps <= bound, f"not finished after {bound} steps: waiting {len(s.waiting)}, running {len(s.running)}"
        s.schedule()  # hands the last finished ids to the runner
        assert not s.requests and not s.waiting and not s.running
        s.kv.check_all_free()


SchedulerMachine.TestCase.settings = state_machine_settings(ci_examples=120, stress_examples=1500)
test_scheduler_state_machine = SchedulerMachine.TestCase

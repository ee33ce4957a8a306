"""The scheduler scheduling one step ahead, under random arrivals, priorities, aborts and pool
sizes (hypothesis, stateful). The fake runner lags a step, as the engine core does with
``async_scheduling``: each step schedules the next one (``schedule(ahead=True)``) before the
results of the one in flight reach ``update``, and aborts land while a step is in flight.

Besides the checks of the one-step-at-a-time machine (budget, ``max_num_seqs``, the pool's
invariants, nothing starves, everything is freed at the end), after every step:
- a step scheduled ahead never preempts;
- no request is ever scheduled past its ``max_tokens``: its outputs plus the tokens in flight
  for it never exceed it;
- the counts of tokens in flight agree with the steps in flight, and are zero once none is.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import rule

from kvloom.scheduler.output import SampledTokens, SchedulerOutput
from tests.engine.test_scheduler_state_machine import EOS, SchedulerMachine
from tests.fakes import state_machine_settings


class AheadSchedulerMachine(SchedulerMachine):
    def __init__(self) -> None:
        super().__init__()
        self.in_flight: tuple[SchedulerOutput, list[str]] | None = None
        self.num_ahead = 0

    def _schedule(self, ahead: bool) -> tuple[SchedulerOutput, list[str]]:
        s = self.sched
        pending = {rid: r.num_pending for rid, r in s.requests.items()}
        preemptions = s.num_preemptions
        out = s.schedule(ahead=ahead)
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        assert out.total_num_scheduled_tokens <= s.config.max_num_batched_tokens
        assert all(n >= 1 for n in out.num_scheduled_tokens.values())
        assert len(s.running) <= s.config.max_num_seqs
        if ahead:
            assert s.num_preemptions == preemptions, "a step scheduled ahead preempted"
        # The fake runner samples for every request whose step reaches its last known token.
        sampled = [rid for rid in out.num_scheduled_tokens if s.requests[rid].num_pending > pending.get(rid, 0)]
        for rid in out.num_scheduled_tokens:
            req = s.requests[rid]
            assert req.num_output_tokens + req.num_pending <= self.max_tokens[rid], f"{rid} scheduled past max_tokens"
            assert req.num_computed_tokens + req.num_inflight_tokens <= req.num_tokens + req.num_pending
        return out, sampled

    def _update(self, step: tuple[SchedulerOutput, list[str]], eos: bool) -> None:
        out, sampled = step
        token = EOS if eos and sampled else 7
        for output in self.sched.update(out, SampledTokens(sampled, [token] * len(sampled))):
            self.outputs[output.req_id] += len(output.new_token_ids)
            if output.finish_reason is not None:
                self.finished.add(output.req_id)

    @rule(eos=st.booleans())
    def step(self, eos: bool) -> None:
        s = self.sched
        current = self.in_flight if self.in_flight is not None else self._schedule(ahead=False)
        self.in_flight = None
        if s.can_schedule_ahead():
            ahead = self._schedule(ahead=True)
            if ahead[0].is_empty:
                self._update(ahead, eos=False)
            else:
                self.in_flight = ahead
                self.num_ahead += 1
        self._update(current, eos)
        if self.in_flight is None:
            for req in s.requests.values():
                assert req.num_inflight_tokens == 0 and req.num_pending == 0, req.request_id

    def has_work(self) -> bool:
        return self.sched.has_unfinished() or self.in_flight is not None


AheadSchedulerMachine.TestCase.settings = state_machine_settings(ci_examples=120, stress_examples=1500)
test_scheduler_ahead_state_machine = AheadSchedulerMachine.TestCase

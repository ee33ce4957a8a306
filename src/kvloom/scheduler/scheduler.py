"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

Each step the scheduler hands out at most ``max_num_batched_tokens`` tokens: running requests
first (a decode costs one token, an unfinished prefill its next chunk), then waiting requests
in priority-then-arrival order while the budget, ``max_num_seqs`` and the free blocks allow.
When a running request cannot get a block, the least important running request (highest
``priority`` value, then latest arrival) is preempted: its blocks are freed and it goes back
to the waiting queue in importance order, to be recomputed from its prompt and outputs so far.

Admission also keeps within ``max_loras`` adapters a step (``AdapterAdmission``, which also
names the requests that pins leave unrunnable), and the choices of an ``n > 1`` request wait in
``Forks`` for their source's prompt KV. Each ``SchedulerOutput.unrunnable`` names a waiting
request that cannot start beside the blocks pinned by prefix handles.

Scheduling ahead (``schedule(ahead=True)``, see ``EngineCore``): the next step is scheduled while
the current one is in flight, as if each of its sampling requests had its token already (each has
``num_pending`` tokens the device knows and the scheduler does not yet). It never preempts (a
victim's KV may still be being written): where a running request cannot get a block it stops
there and says so (``can_schedule_ahead`` is false until a step scheduled in the ordinary way).
A request its pending tokens will end by length is left out; one that turns out to stop (EOS, a
stop string, an abort) has its extra step's token dropped by ``update``.

Chunked prefill off: a prompt is prefilled in one step, so it must fit in
``max_num_batched_tokens`` (the engine refuses longer prompts at submit). A preempted request
recomputes its prompt and outputs, which may no longer fit: that recompute is chunked anyway,
since refusing it would hang the request.
"""

from __future__ import annotations

from collections import deque

from kvloom.config import SchedulerConfig
from kvloom.kv_cache.manager import KVCacheManager
from kvloom.outputs import FinishReason, TokenLogprob
from kvloom.scheduler.adapter_admission import AdapterAdmission, AdapterFit
from kvloom.scheduler.forks import Forks
from kvloom.scheduler.output import (
    CachedRequestData,
    EngineCoreOutput,
    NewRequestData,
    SampledTokens,
    SchedulerOutput,
    Unrunnable,
)
from kvloom.scheduler.plan import StepPlan
from kvloom.scheduler.request import Request, RequestStatus


def _importance(req: Request) -> tuple[int, float]:
    """Sort key: smaller is more important (vLLM's convention for ``priority``)."""
    return (req.priority, req.arrival_time)


class Scheduler:
    """Owns the requests, the waiting and running queues, the forks waiting for their source and
    the adapter pins. Engine-thread only."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int, max_loras: int = 1) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.adapters = AdapterAdmission(max_loras)
        self.forks = Forks()
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_since_last_step: set[str] = set()
        self._known_to_runner: set[str] = set()
        self._copies: list[tuple[int, int]] = []
        self.num_preemptions = 0
        self._step_id = 0
        self._in_flight: dict[int, list[tuple[Request, int]]] = {}
        """Step id -> the requests it scheduled and their token counts, until ``update`` applies it."""
        self._ahead_blocked = False
        """A step scheduled ahead could not give a running request its blocks: the next one preempts."""

    # ---- requests in and out -------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        if req.fork_of is not None and req.fork_of in self.requests:
            self.forks.add(req)
        else:
            self._insert_waiting(req)

    def _insert_waiting(self, req: Request) -> None:
        # Waiting stays sorted by importance; equal keys keep arrival order (FCFS).
        key = _importance(req)
        idx = len(self.waiting)
        while idx > 0 and _importance(self.waiting[idx - 1]) > key:
            idx -= 1
        self.waiting.insert(idx, req)

    def finish_requests(self, req_ids: list[str], reason: FinishReason) -> list[Request]:
        """End requests wherever they are (abort, stop string); frees their blocks at once."""
        done: list[Request] = []
        for rid in req_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status is RequestStatus.RUNNING:
                self.running.remove(req)
            elif not self.forks.remove(req):
                self.waiting.remove(req)
            self._finish(req, reason)
            done.append(req)
        return done

    def _release_forks(self, source_id: str) -> None:
        """The source can no longer be forked: its waiting choices queue as ordinary requests."""
        for child in self.forks.release(source_id):
            self._insert_waiting(child)

    def _start_forks(self) -> None:
        """Choices whose source has computed its prompt start from its KV (see ``Forks.start_ready``)."""
        start = self.forks.start_ready(self.requests, self.kv, self.config.max_num_seqs - len(self.running))
        self.running.extend(start.started)
        self._copies.extend(start.blocks_to_copy)
        for child in start.released:
            self._insert_waiting(child)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self._release_forks(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.kv.free(req.request_id)
        del self.requests[req.request_id]
        if req.request_id in self._known_to_runner:
            self._known_to_runner.discard(req.request_id)
            self._finished_since_last_step.add(req.request_id)

    @property
    def pending_finished_ids(self) -> set[str]:
        """Finished requests the runner has not yet been told about (it is, next step)."""
        return self._finished_since_last_step

    @property
    def num_waiting(self) -> int:
        """Sequences without a slot: queued or preempted, and forks waiting for their source."""
        return len(self.waiting) + len(self.forks)

    def can_serve_lora(self, content_hash: str | None) -> bool:
        """See ``AdapterAdmission.can_serve``."""
        return self.adapters.can_serve(content_hash)

    def set_pinned_loras(self, content_hashes: set[str]) -> dict[str, Unrunnable]:
        """Replace the pinned adapters; the waiting requests (forks included) they leave unrunnable
        (see ``AdapterAdmission.set_pinned``)."""
        return self.adapters.set_pinned(content_hashes, [*self.waiting, *self.forks])

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def can_schedule_ahead(self) -> bool:
        """Whether the next step may be scheduled before the one in flight reports: not when the last
        step scheduled ahead could not get the blocks it needed (the next one preempts)."""
        return not self._ahead_blocked

    # ---- one step ------------------------------------------------------------------------
    def schedule(self, ahead: bool = False) -> SchedulerOutput:
        """The next step: running requests first, then waiting ones while the budget, the seats
        and the blocks allow. ``ahead``: a step is in flight (see the module docstring)."""
        if not ahead:
            self._ahead_blocked = False
        plan = StepPlan(self.config.max_num_batched_tokens)
        self._schedule_running(plan, ahead)
        if not plan.preempted:
            self._schedule_waiting(plan)
        return self._build_output(plan)

    def _schedule_running(self, plan: StepPlan, ahead: bool) -> None:
        """Give each running request, most important first, its next tokens (a decode, or its
        prefill's next chunk). Where blocks run out, preempt from the least important end; ahead
        of a step in flight, stop there instead and leave the preemption to the next step."""
        self.running.sort(key=_importance)
        idx = 0
        while idx < len(self.running) and plan.budget > 0:
            req = self.running[idx]
            idx += 1
            start = req.num_computed_tokens + req.num_inflight_tokens
            if ahead and req.at_length(self.max_model_len, req.num_pending):
                continue  # its pending token ends it by length
            num_new = min(req.num_tokens + req.num_pending - start, plan.budget)
            new_blocks = self._allocate_or_preempt(req, start + num_new, ahead, plan)
            if new_blocks is None:
                # Ahead: no preemption while a step is in flight; admit nobody, and preempt next step.
                self._ahead_blocked = ahead
                plan.preempted = True
                return
            if req.request_id in self._known_to_runner:
                plan.add(req, num_new, CachedRequestData(req.request_id, new_blocks, start, False))
            else:  # a fork, running from its first step
                plan.add(req, num_new, self._new_request_data(req))

    def _allocate_or_preempt(self, req: Request, num_tokens: int, ahead: bool, plan: StepPlan) -> list[int] | None:
        """Slots for ``req``'s first ``num_tokens`` tokens; the new block ids, or None if it cannot
        have them this step. Not ahead, it preempts the least important running request until the
        blocks fit or ``req`` itself is the victim."""
        new_blocks = self.kv.allocate_slots(req.request_id, num_tokens)
        while new_blocks is None and not ahead:
            victim = self.running[-1]
            self._preempt(victim)
            plan.preempted = True
            if victim is req:
                return None
            new_blocks = self.kv.allocate_slots(req.request_id, num_tokens)
        return None if new_blocks is None else [int(b) for b in new_blocks]

    def _schedule_waiting(self, plan: StepPlan) -> None:
        """Admit waiting requests in importance order while the budget and ``max_num_seqs`` allow,
        each from its cached prefix. A request whose adapter does not fit is passed over, or stops
        admission (see ``AdapterAdmission``); so does the first that cannot get its blocks."""
        adapters = self.adapters.for_step(self.running)
        skipped: list[Request] = []
        while self.waiting and plan.budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            fit = adapters.check(req)
            if fit is AdapterFit.BLOCK:
                break
            if fit is AdapterFit.SKIP:
                skipped.append(self.waiting.popleft())
                continue
            if not self._admit(req, plan):
                break
            adapters.add(req)
        self.waiting.extendleft(reversed(skipped))

    def _admit(self, req: Request, plan: StepPlan) -> bool:
        """Start the head of the waiting queue from its cached prefix (waiting requests have no KV:
        new, or preempted); False, leaving it waiting, if its chunk or its blocks do not fit."""
        hits = self.kv.find_cached_prefix(req.request_id, req.token_ids, req.cache_keys)
        num_hit = len(hits) * self.kv.block_size
        num_new = req.num_tokens - num_hit
        if num_new > plan.budget and not self.config.enable_chunked_prefill and req.num_preemptions == 0:
            return False
        num_new = min(num_new, plan.budget)
        # The watermark keeps room for running requests to grow; with none running it would
        # only keep a request that fits the pool from ever starting.
        new_blocks = self.kv.allocate_slots(req.request_id, num_hit + num_new, new_request=bool(self.running),
                                            cached=hits)
        if new_blocks is None:
            return False
        req.num_computed_tokens = num_hit
        if req.num_preemptions == 0:
            req.num_cached_tokens = num_hit
            self.kv.record_lookup(req.num_tokens, num_hit)
        self.waiting.popleft()
        self.running.append(req)
        if req.request_id in self._known_to_runner:
            block_ids = [int(b) for b in self.kv.get_block_ids(req.request_id)]
            plan.add(req, num_new, CachedRequestData(req.request_id, block_ids, req.num_computed_tokens, True))
        else:
            plan.add(req, num_new, self._new_request_data(req))
        req.status = RequestStatus.RUNNING
        return True

    def _build_output(self, plan: StepPlan) -> SchedulerOutput:
        """Mark the planned tokens in flight, number the step, and hand over what the runner must
        hear (finished ids, block copies) and what the engine must act on (unrunnable requests)."""
        for req, n in plan.scheduled:
            if req.num_computed_tokens + req.num_inflight_tokens + n == req.num_tokens + req.num_pending:
                req.num_pending += 1  # it reaches its last known token: this step samples one
            req.num_inflight_tokens += n
        self._step_id += 1
        self._in_flight[self._step_id] = plan.scheduled
        finished, self._finished_since_last_step = self._finished_since_last_step, set()
        copies, self._copies = self._copies, []
        return SchedulerOutput(
            new_reqs=plan.new_reqs,
            cached_reqs=plan.cached_reqs,
            num_scheduled_tokens={req.request_id: n for req, n in plan.scheduled},
            total_num_scheduled_tokens=self.config.max_num_batched_tokens - plan.budget,
            finished_req_ids=finished,
            blocks_to_copy=copies,
            step_id=self._step_id,
            unrunnable=self._stuck_beside_pins(plan),
        )

    def _stuck_beside_pins(self, plan: StepPlan) -> dict[str, Unrunnable]:
        """The head of the queue when nothing runs and it still cannot start: only blocks pinned
        by prefix handles hold the pool (every other block is free or evictable), and they stay
        until the application releases them."""
        if plan.scheduled or self.running or not self.waiting or plan.preempted:
            return {}
        return {self.waiting[0].request_id: Unrunnable.BESIDE_PINNED_PREFIXES}

    def _new_request_data(self, req: Request) -> NewRequestData:
        """The runner's first sight of ``req``. Its processors move with it: the scheduler never
        calls them and keeps no reference (the runner owns them from now on)."""
        self._known_to_runner.add(req.request_id)
        processors, req.processors = req.processors, []
        block_ids = [int(b) for b in self.kv.get_block_ids(req.request_id)]
        return NewRequestData(
            req.request_id, list(req.token_ids), req.num_prompt_tokens, req.params, block_ids, req.num_computed_tokens,
            processors, req.lora,
        )

    def _preempt(self, req: Request) -> None:
        assert req.num_inflight_tokens == 0, "preempting a request with a step in flight"
        self._release_forks(req.request_id)
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        # Back in importance order, not at the head: a more important waiting request keeps
        # its place ahead of it (its arrival time still puts it before later equals).
        self._insert_waiting(req)

    def update(self, sched: SchedulerOutput, sampled: SampledTokens) -> list[EngineCoreOutput]:
        """Apply a step's results (steps in the order scheduled): advance computed counts, append
        sampled tokens, finish requests that hit a stop. Requests that ended while the step was in
        flight are skipped."""
        scheduled = self._in_flight.pop(sched.step_id)
        step = {req.request_id: req for req, _ in scheduled}
        for req, n in scheduled:
            if not req.is_finished:
                req.num_computed_tokens += n
                req.num_inflight_tokens -= n
                self.kv.cache_computed_blocks(req.request_id, req.token_ids, req.num_computed_tokens, req.cache_keys)
        outputs: list[EngineCoreOutput] = []
        logprobs = sampled.logprobs
        for i, (rid, token) in enumerate(zip(sampled.req_ids, sampled.token_ids, strict=True)):
            req = step[rid]
            if req.is_finished:
                continue
            req.num_pending -= 1
            req.token_ids.append(token)
            reason = sampled.finish_reasons.get(rid) or req.stop_reason_after(token, self.max_model_len)
            lp: TokenLogprob | None = logprobs[i] if logprobs is not None else None
            pinned: list[int] | None = None
            if reason is not None:
                if req.pin_prefix:
                    # Pinned while the request still holds its blocks: nothing can evict them
                    # between its free and the pin (forks allocate in this same update).
                    pinned = [int(b) for b in self.kv.pin(req.prompt_token_ids, req.cache_keys)]
                self.running.remove(req)
                self._finish(req, reason)
            outputs.append(
                EngineCoreOutput(
                    rid, [token], [lp] if lp is not None else None, reason,
                    req.num_prompt_tokens, req.num_cached_tokens, pinned,
                )
            )
        self._start_forks()
        return outputs

"""``SharedDriver``: one ``EngineDriver`` stepped by whichever calling thread needs it.

``LLM`` has no event loop and no thread of its own: the threads that call it drive the engine.
Each call queues its requests, then either steps the engine (when no other thread does) or waits.
The thread that steps routes every ended request to the call that made it, so calls made at the
same time are batched together, and it hands the role on when its own call is over.

Invariants: only the thread holding the driver role touches the driver (and the core inside it);
a parent request id maps to exactly one live call until it ends; a call is over once all its
requests are done or one of them failed (its others are then aborted).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from kvloom.engine.driver import EngineDriver
from kvloom.engine.messages import NewRequest, StepInput, StepOutput
from kvloom.engine.progress import BatchProgress
from kvloom.errors import EngineError, RequestTimeoutError
from kvloom.outputs import Completion


@dataclass(slots=True)
class Call:
    """One ``generate`` / ``chat`` call: its requests, in prompt order, and what came back."""

    order: list[str]
    progress: BatchProgress
    done: dict[str, Completion] = field(default_factory=dict)
    error: BaseException | None = None
    """Set when one of its requests failed or timed out; the others were aborted then."""

    @property
    def is_over(self) -> bool:
        return self.error is not None or len(self.done) == len(self.order)


class SharedDriver:
    """Lets any number of threads run calls on one driver (see the module doc)."""

    def __init__(self, driver: EngineDriver, request_timeout: float | None) -> None:
        self.driver = driver
        self._request_timeout = request_timeout
        self._cond = threading.Condition()
        """Guards everything below; waiting threads sleep on it."""
        self._driving = False
        """Whether a thread holds the driver role."""
        self._pending = StepInput()
        """What the next step applies first: other threads' new requests, aborts and adapter pins."""
        self._calls: dict[str, Call] = {}
        """Parent request id -> the call it belongs to, until it ends."""

    def run(self, adds: list[NewRequest], progress: BatchProgress) -> Call:
        """Queue ``adds`` and drive (or wait) until they are over; returns the call, whose
        ``error`` the caller raises. An exception in this thread (Ctrl-C) aborts its requests."""
        call = Call([r.request_id for r in adds], progress)
        with self._cond:
            self._pending.adds.extend(adds)
            self._calls.update((rid, call) for rid in call.order)
        try:
            self._drive_until(lambda: call.is_over)
        except BaseException:
            self._abandon(call)
            raise
        return call

    @contextmanager
    def driver_role(self) -> Iterator[None]:
        """Wait for and hold the driver role (no other thread steps meanwhile)."""
        self._take_role(lambda: False)
        try:
            yield
        finally:
            self._release_role()

    def _take_role(self, is_over: Callable[[], bool]) -> bool:
        """Wait until the role is free or ``is_over()``; take the role unless it is over. Returns
        whether this thread now holds it."""
        with self._cond:
            while self._driving and not is_over():
                self._cond.wait()
            if is_over():
                return False
            self._driving = True
            return True

    def _release_role(self) -> None:
        with self._cond:
            self._driving = False
            self._cond.notify_all()

    def _drive_until(self, is_over: Callable[[], bool]) -> None:
        """Step (or wait while another thread steps) until ``is_over()``."""
        while self._take_role(is_over):
            try:
                self._step()
            finally:
                self._release_role()

    def step_once(self, extra: StepInput) -> None:
        """Apply ``extra`` (adapter pins) with one step, waiting for the driver role."""
        with self.driver_role():
            with self._cond:
                self._pending.pinned_adapters = extra.pinned_adapters
            self._step()

    def _step(self) -> None:
        """One hand-off and step; the caller holds the driver role. A failed step fails every
        call in flight and aborts all their requests, so the engine stays usable."""
        with self._cond:
            step_input, self._pending = self._pending, StepInput()
        try:
            result = self.driver.run(step_input)
        except BaseException as exc:
            error = EngineError(f"engine step failed: {exc!r}")
            error.__cause__ = exc
            with self._cond:
                for call in {id(c): c for c in self._calls.values()}.values():
                    call.error = error
                ids, self._calls = list(self._calls), {}
            for rid in ids + [r.request_id for r in step_input.adds]:
                self.driver.abort(rid)
            raise
        with self._cond:
            self._route(result)

    def _route(self, result: StepOutput) -> None:
        """Hand each ended request to its call and count progress; a call with a failed or
        timed-out request has its other requests aborted. Holds ``_cond`` and the driver role."""
        progress: dict[int, tuple[Call, int, int]] = {}  # id(call) -> (call, finished, tokens)

        def count(request_id: str, finished: int, tokens: int) -> None:
            call = self._calls.get(request_id)
            if call is not None:
                _, f, t = progress.get(id(call), (call, 0, 0))
                progress[id(call)] = (call, f + finished, t + tokens)

        for delta in result.deltas:
            count(delta.request_id, 0, len(delta.token_ids))
        for completion in result.finished:
            count(completion.request_id, 1, 0)
        for counted, finished, tokens in progress.values():
            counted.progress.update(finished, tokens)
        for completion in result.finished:
            owner = self._calls.pop(completion.request_id, None)
            if owner is not None:
                owner.done[completion.request_id] = completion
        for completion in result.aborted:
            self._calls.pop(completion.request_id, None)
        timeout = self._request_timeout
        failures: list[tuple[str, BaseException]] = [(f.request_id, f.error) for f in result.failed]
        failures += [(c.request_id, RequestTimeoutError(
            f"request {c.request_id!r} passed request_timeout={timeout}s and was aborted")) for c in result.timed_out]
        for request_id, error in failures:
            failed = self._calls.pop(request_id, None)
            if failed is not None and failed.error is None:
                failed.error = error
                self._abort_call(failed)

    def _abort_call(self, call: Call) -> None:
        """End every request of ``call`` still in the engine (the caller holds the driver role)."""
        for rid in call.order:
            if self._calls.pop(rid, None) is not None:
                self.driver.abort(rid)

    def _abandon(self, call: Call) -> None:
        """An exception left ``call`` in this thread (Ctrl-C, a failed step): end its requests.
        If another thread drives now, the aborts wait for its next step."""
        with self._cond:
            unfinished = {rid for rid in call.order if self._calls.pop(rid, None) is not None}
            self._pending.adds = [r for r in self._pending.adds if r.request_id not in unfinished]
            if self._driving:
                self._pending.aborts.extend(unfinished)
                return
            self._driving = True
        try:
            for rid in unfinished:
                self.driver.abort(rid)
        finally:
            self._release_role()

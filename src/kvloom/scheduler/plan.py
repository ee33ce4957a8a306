"""One ``Scheduler.schedule`` call's work in progress, turned into a ``SchedulerOutput`` at its end."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvloom.scheduler.output import CachedRequestData, NewRequestData
from kvloom.scheduler.request import Request


@dataclass(slots=True)
class StepPlan:
    """One ``schedule`` call's work in progress: what it has given out, in scheduling order."""

    budget: int
    """Tokens still to give out this step."""
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    """Each scheduled request and its token count (at most once each)."""
    new_reqs: list[NewRequestData] = field(default_factory=list)
    cached_reqs: list[CachedRequestData] = field(default_factory=list)
    preempted: bool = False
    """A running request lost its blocks, or could not get them ahead of a step in flight: no
    waiting request is admitted this step."""

    def add(self, req: Request, num_tokens: int, data: NewRequestData | CachedRequestData) -> None:
        """Give ``req`` ``num_tokens`` tokens of the budget; ``data`` is what the runner hears of it."""
        self.scheduled.append((req, num_tokens))
        self.budget -= num_tokens
        if isinstance(data, NewRequestData):
            self.new_reqs.append(data)
        else:
            self.cached_reqs.append(data)

"""Where the time of constrained decoding goes: grammar compiles, and the steps that apply grammars.

Two thread-safe recorders; ``engine.stats()`` reads copies of them while others write:

- :class:`CompileTimes`: each compile's time from its submission to its result (queueing in the
  compile pool included): what the first request of a new grammar waits before it can start.
  Written by the compile pools' threads.
- :class:`ConstrainedStepTimes`: per step in which some sequence had a logits processor, the
  time spent in processors (mask fill, mask apply, accepts) and the step's wall time (forward,
  sampling and processors): whether a slow constrained step is the grammar's doing or not.
  Written by the engine thread, which copies it into each step's snapshot. Keeps the last
  ``window`` steps (percentiles and maxima are over those; the all-time mean is the runner's
  ``processor_time_s / num_constrained_steps``).

Recording costs a lock and a ``deque.append`` per event; a snapshot after a constrained step copies
the window (two 1000-float tuples, ~10-20 us); nothing is sorted until ``stats()`` asks.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class CompileSummary:
    """Compiles so far: how many ran, and their times from submission to result."""

    num_compiles: int
    """Compiles that ran to a result or an error (cache hits and cancelled compiles are not counted)."""
    total_s: float
    max_s: float


class CompileTimes:
    """Thread-safe tally of compile durations. Invariant: ``max_s <= total_s`` and ``num_compiles``
    counts every :meth:`record`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._num = 0
        self._total = 0.0
        self._max = 0.0

    def record(self, seconds: float) -> None:
        with self._lock:
            self._num += 1
            self._total += seconds
            self._max = max(self._max, seconds)

    def summary(self) -> CompileSummary:
        with self._lock:
            return CompileSummary(self._num, self._total, self._max)


@dataclass(slots=True, frozen=True)
class StepTimesSample:
    """A copy of the recorded window, oldest step first. Invariant: both tuples have one entry per
    step, in the same order, and ``processor_s[i] <= step_s[i]`` as recorded by the runner."""

    processor_s: tuple[float, ...]
    """Per constrained step: seconds in logits processors."""
    step_s: tuple[float, ...]
    """Per constrained step: its wall time, forward to accepts."""


class ConstrainedStepTimes:
    """Thread-safe rolling window of per-step processor and wall times of constrained steps."""

    def __init__(self, window: int = 1000) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._lock = threading.Lock()
        self._processor: deque[float] = deque(maxlen=window)
        self._step: deque[float] = deque(maxlen=window)
        self._sample: StepTimesSample | None = StepTimesSample((), ())
        """The last copy handed out; None once a step was recorded after it."""

    def record(self, processor_s: float, step_s: float) -> None:
        """One constrained step: ``processor_s`` of its ``step_s`` wall seconds went to processors."""
        with self._lock:
            self._processor.append(processor_s)
            self._step.append(step_s)
            self._sample = None

    def sample(self) -> StepTimesSample:
        """A copy of the window (the same object until the next ``record``: a few microseconds per
        constrained step at most)."""
        with self._lock:
            if self._sample is None:
                self._sample = StepTimesSample(tuple(self._processor), tuple(self._step))
            return self._sample

"""The engine thread: one long-lived thread that runs the async engine's compute (the load, every step,
the close), awaited from the event loop.

One thread, not a worker pool's next free thread: each thread that runs torch ops or kvloom's C kernels
gets an OpenMP worker pool of its own, and a process with more pool threads than CPUs spins less between
parallel regions and runs every step slower (``engine.openmp_pool``). A job is awaited the way
``anyio.to_thread.run_sync`` is by default: cancelling the waiting task does not stop the job; the task
waits for it to end, then sees the cancellation.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel

from kvloom.engine.background import Waker

T = TypeVar("T")


@dataclass(slots=True)
class _Job(Generic[T]):
    fn: Callable[[], T]
    waker: Waker
    done: anyio.Event
    result: Any = None
    error: BaseException | None = None


class EngineThread:
    """Runs jobs one at a time, in order, on one daemon thread (started by the first job, ended by
    ``close`` or when this object is collected). ``run`` may be awaited from one event loop at a time."""

    def __init__(self, name: str = "kvloom-engine") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def ident(self) -> int | None:
        """The thread's id once started (None before)."""
        return self._thread.ident if self._thread is not None else None

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the engine thread; its result, or its exception re-raised here."""
        job: _Job[T] = _Job(fn, Waker(), anyio.Event())
        with self._lock:
            if self._thread is None:
                jobs = self._jobs
                self._thread = threading.Thread(target=_serve, args=(jobs,), name=self._name, daemon=True)
                self._thread.start()
                weakref.finalize(self, jobs.put, None)
            self._jobs.put(job)
        with anyio.CancelScope(shield=True):
            await job.done.wait()
        await anyio.lowlevel.checkpoint_if_cancelled()
        if job.error is not None:
            raise job.error
        result: T = job.result
        return result

    def close(self) -> None:
        """End the thread after the jobs already queued (idempotent; does not wait for it)."""
        with self._lock:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread = None


def _serve(jobs: queue.SimpleQueue[_Job[Any] | None]) -> None:
    """The thread's body: run jobs until a None (it holds the queue, not the ``EngineThread``)."""
    while (job := jobs.get()) is not None:
        try:
            job.result = job.fn()
        except BaseException as exc:  # re-raised on the loop by run()
            job.error = exc
        job.waker.post(job.done.set)

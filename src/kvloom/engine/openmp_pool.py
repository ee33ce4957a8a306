"""The OpenMP runtime's thread pools, and why the engine keeps to one of them.

GNU OpenMP (libgomp, which torch's Linux wheels bundle and kvloom's C kernels join) gives every
thread that starts a parallel region a pool of worker threads of its own. Between regions the
workers spin for a while before they sleep, so the next region starts without a wake-up; but
while the process holds more pool threads than it has CPUs, libgomp cuts the spin to ~100
iterations, and every region then pays a futex wake per worker. An engine thread beside a loop
thread that once ran a torch op is past that limit on a 2-core machine. Measured on a 2-core AMD
EPYC (one int8 decode step is ~40 short parallel regions): one int8 linear took 66 us on the
thread that owned the only pool and 154-184 us on a second thread; after the first thread freed
its pool, 74-81 us (``docs/benchmarks.md``, the ``bench single`` section).

So the async engine runs all its compute on one thread (``engine.engine_thread``), which frees its
pool after the load (``engine.build``) and whenever the engine goes idle, and the event loop's thread
frees its own (:func:`release_calling_thread_pool`) at the start of each turn, while the engine thread
is idle: a pool that torch ops on the loop thread made in between is gone before the next step.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

OMP_PAUSE_SOFT = 1
"""``omp_pause_soft`` (OpenMP 5.0): free the resources; the next parallel region rebuilds them."""


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp this process already runs (torch's), or None: another OpenMP runtime, another OS."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps.splitlines() if "/libgomp" in line}
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # already mapped: the same copy, not a second runtime
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource") and hasattr(lib, "omp_get_initial_device"):
            return lib
    return None


def release_calling_thread_pool() -> bool:
    """Free the calling thread's libgomp worker pool, if it has one (its next parallel region builds a
    new one). Other threads' pools and regions are untouched. True when libgomp said it did; False
    where there is no libgomp, or inside a parallel region."""
    lib = _libgomp()
    if lib is None:
        return False
    return int(lib.omp_pause_resource(OMP_PAUSE_SOFT, lib.omp_get_initial_device())) == 0

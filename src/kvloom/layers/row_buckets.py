"""The row counts a oneDNN-packed GEMM is run at: a small, bounded set.

oneDNN builds (JIT-compiles) and caches one kernel per distinct problem shape, and the row count
``M`` (the step's tokens) is part of the shape. A server sees every ``M`` from 1 to
``max_num_batched_tokens``, so with exact row counts it compiles on the request path whenever a
new size appears (~3 ms each) and keeps ~0.6 MB of kernels per (weight shape, ``M``), besides
the heap that allocations of ever-new sizes fragment: measured on a one-layer checkpoint, RSS
grew from ~535 MB to ~1060 MB over ~24,000 requests of random lengths before it levelled off.

So a packed ``Linear`` pads its input to :func:`padded_rows` rows (zero rows; their outputs are
dropped): exact up to ``EXACT_ROWS``, then 8 sizes per power of two (each octave ``[2^k, 2^(k+1))``
in steps of ``2^(k-3)``). Padding costs at most 1/8 of the rows beyond 16 (about 3% on average
for a uniform mix) and 72 sizes cover every ``M`` up to 2048. The standard CPU workload's steps
run at 2048, 64 and a handful of other sizes, so it pays well under 1% (see docs/benchmarks.md).
"""

from __future__ import annotations

EXACT_ROWS = 16
"""Row counts up to this run unpadded (decode steps of a few users: every row is latency)."""

STEPS_PER_OCTAVE = 8
"""Sizes per power of two above ``EXACT_ROWS``; the most a step is padded by is 1/8 of its rows."""


def padded_rows(rows: int) -> int:
    """The smallest bucket ``>= rows``. Invariants: ``rows <= padded_rows(rows) < rows * 9/8``
    for ``rows > EXACT_ROWS`` (exact below), monotonic, and idempotent (a bucket maps to itself)."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 1 - (STEPS_PER_OCTAVE.bit_length() - 1))
    return -(-rows // step) * step


def buckets_up_to(max_rows: int) -> list[int]:
    """Every distinct ``padded_rows`` value for row counts ``1..max_rows``, ascending."""
    return sorted({padded_rows(m) for m in range(1, max_rows + 1)})

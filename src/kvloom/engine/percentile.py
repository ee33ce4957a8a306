"""The one percentile of kvloom: ``engine.stats()``'s p50/p99 and the benchmarks' use it alike.

Definition: linear interpolation between the closest ranks, numpy's default (``method="linear"``,
Hyndman and Fan's type 7). For ``n`` samples sorted ascending as ``x[0] <= ... <= x[n-1]``, the
quantile ``q`` sits at rank ``h = (n - 1) x q`` and is ``x[floor(h)] + (h - floor(h)) x
(x[floor(h) + 1] - x[floor(h)])``. So ``q = 0`` is the minimum, ``q = 1`` the maximum, ``q = 0.5``
the median (the mean of the middle two for an even ``n``), one sample is every quantile, and the
result never leaves ``[min, max]``. It equals ``numpy.quantile(values, q)`` and
``numpy.percentile(values, 100 * q)`` up to float rounding.

Chosen because it is numpy's default, what a reader checks a number against, and how the
benchmarks' published p50/p99 were computed. Over few samples a p99 lies between the two slowest
observations rather than on one of them: where a single outlier matters, read the ``max`` beside it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-quantile of ``values`` (``q`` a fraction in [0, 1]: 0.99 for p99), linear between
    closest ranks as above; None when there are no values.

    ``q`` outside [0, 1] raises ``ValueError`` (so a percent, ``99``, is refused, not clamped).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q is a fraction in [0, 1] (0.99 for p99), got {q}")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    below, above = ordered[low], ordered[high]
    # Clamped: rounding in the product must not carry the value past its neighbours.
    return min(max(below + (above - below) * (rank - low), below), above)

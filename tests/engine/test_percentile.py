"""kvloom's one percentile (``kvloom.engine.percentile``): numpy's default, linear interpolation between
the closest ranks, with q a fraction; ``engine.stats()`` and ``bench serve`` both report it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvloom.engine.percentile import percentile


def test_linear_between_the_closest_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted 1 2 3 4: rank (n - 1) x q
    assert percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 4.0
    assert percentile(values, 0.5) == 2.5  # between the middle two
    assert percentile(values, 0.99) == pytest.approx(3.97)  # rank 2.97: 3 + 0.97 x (4 - 3)
    assert percentile(values, 1 / 3) == pytest.approx(2.0)  # on a rank exactly
    # One slow sample in 100: p99 sits between the two slowest (rank 98.01), not on the outlier.
    assert percentile([1.0] * 99 + [101.0], 0.99) == pytest.approx(2.0)


def test_edge_cases() -> None:
    assert percentile([], 0.99) is None
    assert percentile([7.0], 0.99) == 7.0 and percentile([7.0], 0.0) == 7.0
    assert percentile(iter([2.0, 1.0]), 0.5) == 1.5  # any iterable, read once
    for bad in (-0.01, 1.01, 99.0):
        with pytest.raises(ValueError, match="fraction"):
            percentile([1.0], bad)


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=200),
       st.floats(min_value=0.0, max_value=1.0))
def test_equals_numpys_default(values: list[float], q: float) -> None:
    got = percentile(values, q)
    assert got is not None and min(values) <= got <= max(values)
    assert got == pytest.approx(float(np.quantile(values, q)), rel=1e-9, abs=1e-6)
    assert got == pytest.approx(float(np.percentile(values, 100 * q)), rel=1e-9, abs=1e-6)

"""Goodput from synthetic traces (``kvloom.bench.analysis.goodput``, pure), and the sweep's ladder and
request counts (``kvloom.bench.sweep``)."""

from __future__ import annotations

import math

import pytest

from kvloom.bench.analysis.goodput import (
    Goodput,
    RatePoint,
    format_rate,
    goodput,
    goodput_ratio,
    meets,
    should_stop,
    slo_attainment,
)
from kvloom.bench.peers import RequestTrace
from kvloom.bench.sweep import parse_ladder, requests_at

LADDER = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]


def _trace(ttft: float, tpot: float, tokens: int = 5, arrival: float = 100.0) -> RequestTrace:
    first = arrival + ttft
    return RequestTrace(arrival, arrival, first, first + tpot * (tokens - 1), list(range(tokens)))


def _points(attainments: list[float | None], ladder: list[float] = LADDER) -> list[RatePoint]:
    return [RatePoint(rate, a) for rate, a in zip(ladder, attainments, strict=False)]


def test_attainment_needs_both_ttft_and_tpot_within_the_slo() -> None:
    traces = [
        _trace(0.5, 0.1),  # meets both
        _trace(2.0, 0.2),  # exactly at both limits: meets
        _trace(2.01, 0.05),  # TTFT too late
        _trace(0.1, 0.21),  # TPOT too slow
        _trace(3.0, 0.0, tokens=1),  # one token: no TPOT, TTFT alone decides (misses)
        _trace(1.0, 0.0, tokens=1),  # one token, TTFT in time: meets
    ]
    assert slo_attainment(traces, slo_ttft=2.0, slo_tpot=0.2) == pytest.approx(3 / 6)
    assert slo_attainment(traces, slo_ttft=10.0, slo_tpot=10.0) == 1.0
    assert slo_attainment(traces, slo_ttft=0.01, slo_tpot=10.0) == 0.0
    with pytest.raises(ValueError):
        slo_attainment([], 1.0, 1.0)


def test_goodput_when_nothing_meets() -> None:
    g = goodput(_points([0.5, 0.2]), 0.9, LADDER)
    assert g == Goodput(rate=0.0, lower_bound=False, stopped_after=1.0, misses_below=())
    assert format_rate(g.rate) == "no rate"


def test_goodput_when_every_rate_meets_is_a_lower_bound() -> None:
    g = goodput(_points([1.0] * 8), 0.9, LADDER)
    assert g == Goodput(rate=8.0, lower_bound=True, stopped_after=None, misses_below=())
    assert format_rate(g.rate, g.lower_bound) == ">= 8 req/s"
    # Up to all at once: inf is the top, and not a bound of anything.
    with_inf = [*LADDER, math.inf]
    g = goodput(_points([1.0] * 9, with_inf), 0.9, with_inf)
    assert g.rate == math.inf and not g.lower_bound and format_rate(g.rate) == "all at once"


def test_goodput_is_the_highest_rate_met_even_when_attainment_is_not_monotone() -> None:
    # Meets at 0.5 and 1, misses at 1.5 (noise), meets again at 2, then misses 3 and 4 and stops.
    points = _points([1.0, 0.95, 0.85, 0.9, 0.5, 0.1])
    g = goodput(points, 0.9, LADDER)
    assert g.rate == 2.0 and not g.lower_bound  # 0.9 is exactly the target: met
    assert g.misses_below == (1.5,) and g.stopped_after == 4.0


def test_climbing_stops_after_two_misses_in_a_row_or_an_error() -> None:
    target = 0.9
    assert not should_stop(_points([]), target)
    assert not should_stop(_points([0.5]), target)  # one miss: keep climbing
    assert not should_stop(_points([0.5, 1.0]), target)
    assert not should_stop(_points([1.0, 0.5, 0.95, 0.2]), target)  # misses, but not in a row
    assert should_stop(_points([1.0, 0.5, 0.2]), target)
    assert should_stop(_points([1.0, None]), target)  # failed: nothing to climb with
    assert not meets(None, target) and meets(0.9, target) and not meets(0.8999, target)
    # An early stop: goodput from the rates measured, and where it stopped.
    g = goodput(_points([1.0, 0.5, 0.2]), target, LADDER)
    assert g.rate == 0.5 and g.stopped_after == 1.5 and not g.lower_bound and g.misses_below == ()


def test_the_goodput_ratio_handles_zero_inf_and_bounds() -> None:
    def g(rate: float, lower_bound: bool = False) -> Goodput:
        return Goodput(rate, lower_bound, None, ())

    assert goodput_ratio(g(3.0), g(1.5)) == (2.0, "exact on this ladder")
    ratio, note = goodput_ratio(g(8.0, lower_bound=True), g(2.0))
    assert ratio == 4.0 and note.startswith("at least")
    ratio, note = goodput_ratio(g(1.0), g(8.0, lower_bound=True))
    assert ratio == 0.125 and note.startswith("at most")
    assert goodput_ratio(g(2.0), g(0.0)) == (None, "the peers meet no rate; kvloom meets up to 2 req/s")
    assert goodput_ratio(g(0.0), g(2.0)) == (0.0, "exact on this ladder")
    assert goodput_ratio(g(0.0), g(0.0))[0] is None and "neither" in goodput_ratio(g(0.0), g(0.0))[1]
    assert goodput_ratio(g(8.0, True), g(8.0, True)) == (None, "both meet the SLO at the ladder's top rate: extend --sweep")
    assert goodput_ratio(g(math.inf), g(2.0)) == (None, "kvloom all at once, best peer 2 req/s")
    assert goodput_ratio(g(2.0), None) == (None, "no peer ran")


def test_the_ladder_parses_sorted_and_rejects_bad_rates() -> None:
    assert parse_ladder("2, 0.5,inf,1,2") == [0.5, 1.0, 2.0, math.inf]
    for bad, says in (("fast", "'fast' is not a rate"), ("1,0", "must be > 0"), ("-1", "must be > 0"),
                      ("nan", "must be > 0"), (",", "no rates")):
        with pytest.raises(ValueError, match=r"^--sweep: ") as info:
            parse_ladder(bad)
        assert says in str(info.value)


def test_low_rates_serve_fewer_requests_a_prefix_of_the_same_schedule() -> None:
    assert [requests_at(r, 32.0, 64) for r in LADDER] == [16, 32, 48, 64, 64, 64, 64, 64]
    assert requests_at(0.1, 32.0, 64) == 16  # never below the minimum ...
    assert requests_at(0.1, 32.0, 6) == 6  # ... nor above the workload
    assert requests_at(math.inf, 1.0, 64) == 64 and requests_at(0.5, math.inf, 64) == 64

"""SLO attainment and goodput, as serving papers measure them (pure functions, no I/O).

A request *meets the SLO* when its TTFT <= ``slo_ttft`` and its TPOT <= ``slo_tpot`` (a request
with one output token has no TPOT: its TTFT alone decides). A system's *attainment* at a rate is
the share of its requests that meet it; its *goodput* is the highest rate of the ladder at which
the attainment reaches the target (e.g. 90%), 0 when no rate does.

Invariants: ``goodput`` looks only at the rates measured, whatever their order of attainment
(a rate missed below the goodput is listed in ``misses_below``, not hidden); the goodput is a
lower bound (``lower_bound``) exactly when it is the ladder's top finite rate, since the system
was never asked for more. ``inf`` (every request at once) is a rate like the others, above all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvloom.bench.analysis.latency import Trace

STOP_AFTER_MISSES = 2
"""A system below the target at this many consecutive rates stops climbing the ladder."""


@dataclass(frozen=True, slots=True)
class RatePoint:
    """One system at one rate: its attainment, or None when it failed there (an error)."""

    rate: float
    attainment: float | None


@dataclass(frozen=True, slots=True)
class Goodput:
    rate: float
    """The highest measured rate meeting the target; 0.0 when none does."""
    lower_bound: bool
    """The goodput is the ladder's top (finite) rate: the system may sustain more."""
    stopped_after: float | None
    """The last rate measured when the system stopped before the ladder's top, else None."""
    misses_below: tuple[float, ...]
    """Rates below ``rate`` where the target was missed (attainment not monotone in the rate)."""


def slo_attainment(traces: Sequence[Trace], slo_ttft: float, slo_tpot: float) -> float:
    """The share of ``traces`` meeting both SLOs (TTFT from the scheduled arrival, TPOT = (end -
    first token) / (output tokens - 1), as ``latency.summarize`` measures them)."""
    if not traces:
        raise ValueError("no requests to measure the attainment of")
    met = 0
    for t in traces:
        tpot = (t.end - t.first_token) / (len(t.token_ids) - 1) if len(t.token_ids) > 1 else 0.0
        met += t.first_token - t.arrival <= slo_ttft and tpot <= slo_tpot
    return met / len(traces)


def meets(attainment: float | None, target: float) -> bool:
    """Whether ``attainment`` reaches ``target`` (an error never does)."""
    return attainment is not None and attainment >= target


def should_stop(points: Sequence[RatePoint], target: float) -> bool:
    """Stop climbing: an error at the last rate, or the last ``STOP_AFTER_MISSES`` rates all missed."""
    if points and points[-1].attainment is None:
        return True
    last = points[-STOP_AFTER_MISSES:]
    return len(last) == STOP_AFTER_MISSES and not any(meets(p.attainment, target) for p in last)


def goodput(points: Sequence[RatePoint], target: float, ladder: Sequence[float]) -> Goodput:
    """The goodput of one system from its measured ``points`` (ascending rates, a prefix of
    ``ladder`` when it stopped early) at attainment ``target``."""
    met = [p.rate for p in points if meets(p.attainment, target)]
    rate = max(met, default=0.0)
    top = max(ladder)
    last = points[-1].rate if points else None
    stopped = last if last is not None and last < top else None
    return Goodput(
        rate=rate,
        lower_bound=bool(met) and rate == top and not math.isinf(rate),
        stopped_after=stopped,
        misses_below=tuple(p.rate for p in points if p.rate < rate and not meets(p.attainment, target)),
    )


def goodput_ratio(kvloom: Goodput, best_peer: Goodput | None) -> tuple[float | None, str]:
    """kvloom's goodput over the best peer's, and a sentence saying how to read it (None where a
    ratio would mislead: a peer meeting no rate, a rate of ``inf``, both at the ladder's top)."""
    k, p = kvloom.rate, None if best_peer is None else best_peer.rate
    if p is None or best_peer is None:
        return None, "no peer ran"
    if k == 0 and p == 0:
        return None, "neither kvloom nor any peer meets the SLO at any rate"
    if p == 0:
        return None, f"the peers meet no rate; kvloom meets up to {format_rate(k)}"
    if math.isinf(k) or math.isinf(p):
        both = math.isinf(k) and math.isinf(p)
        return None, ("both meet the SLO even with every request at once" if both
                      else f"kvloom {format_rate(k)}, best peer {format_rate(p)}")
    if kvloom.lower_bound and best_peer.lower_bound:
        return None, "both meet the SLO at the ladder's top rate: extend --sweep"
    ratio = k / p
    if kvloom.lower_bound:
        return ratio, "at least (kvloom met the ladder's top rate)"
    if best_peer.lower_bound:
        return ratio, "at most (the best peer met the ladder's top rate)"
    return ratio, "exact on this ladder"


def format_rate(rate: float, lower_bound: bool = False) -> str:
    """``"3 req/s"``, ``">= 8 req/s"``, ``"all at once"``, ``"no rate"``."""
    if math.isinf(rate):
        return "all at once"
    if rate == 0:
        return "no rate"
    return f"{'>= ' if lower_bound else ''}{rate:g} req/s"


def rate_json(rate: float) -> float | str:
    """A rate for JSON: a number, or ``"inf"`` (JSON has no infinity)."""
    return "inf" if math.isinf(rate) else rate

"""Latency of served requests, as ``bench serve``, ``--sweep`` and ``bench prefix`` report it.

From each request's timeline (``Trace``, ``time.perf_counter`` seconds): TTFT = first token -
scheduled arrival; TPOT = (end - first token) / (output tokens - 1), for requests with more than
one token; E2E = end - scheduled arrival; output tokens/s over (last end - first arrival). Each
is summarized as its mean, p50, p90 and p99, the percentiles of ``kvloom.engine.percentile``
(the same as ``engine.stats()``'s: linear between closest ranks, numpy's default).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, Protocol

from kvloom.engine.percentile import percentile


class Trace(Protocol):
    """One served request's timeline (``kvloom.bench.peers.RequestTrace`` is one)."""

    @property
    def arrival(self) -> float:
        """Its scheduled arrival: every latency counts from here, so a late submit counts too."""

    @property
    def submitted(self) -> float:
        """When the system was handed it."""

    @property
    def first_token(self) -> float: ...

    @property
    def end(self) -> float: ...

    @property
    def token_ids(self) -> list[int]: ...

    @property
    def num_chunks(self) -> int:
        """Stream chunks (or per-token timestamps) that carried its tokens."""


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, p50, p90 and p99 of ``values``, rounded to 4 digits; all None without values."""
    def rounded(q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(value, 4)

    return {"mean": round(statistics.fmean(values), 4) if values else None, "p50": rounded(0.5),
            "p90": rounded(0.9), "p99": rounded(0.99)}


def summarize(traces: Sequence[Trace]) -> dict[str, Any]:
    """Latency distributions, output tokens/s over (last end - first arrival), per-request records
    (``traces`` not empty)."""
    ttft = [t.first_token - t.arrival for t in traces]
    tpot = [(t.end - t.first_token) / (len(t.token_ids) - 1) for t in traces if len(t.token_ids) > 1]
    e2e = [t.end - t.arrival for t in traces]
    span = max(t.end for t in traces) - min(t.arrival for t in traces)
    num_tokens = sum(len(t.token_ids) for t in traces)
    return {
        "output_tokens_per_s": round(num_tokens / span, 2), "duration_s": round(span, 3), "output_tokens": num_tokens,
        "ttft_s": distribution(ttft), "tpot_s": distribution(tpot), "e2e_s": distribution(e2e),
        "max_submit_lag_s": round(max(t.submitted - t.arrival for t in traces), 4),
        "requests": [{"ttft_s": round(a, 4), "e2e_s": round(b, 4), "output_tokens": len(t.token_ids),
                      "chunks": t.num_chunks} for a, b, t in zip(ttft, e2e, traces, strict=True)],
    }

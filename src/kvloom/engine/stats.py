"""``engine.stats()``: queue sizes, KV usage and latency percentiles, kept on the event loop."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvloom.engine.messages import EngineSnapshot


@dataclass(slots=True, frozen=True)
class EngineStats:
    healthy: bool
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    num_timeouts: int
    """Requests aborted at their deadline (``timeout=`` / ``request_timeout``)."""
    prefix_cache_hit_rate: float
    """Share of looked-up prompt tokens whose KV came from the prefix cache."""
    tokens_per_s: float
    """Output tokens per second over the last ``window_s`` seconds."""
    ttft_p50: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p99: float | None
    error: str | None
    logits_processor_ms_per_step: float | None = None
    """Mean time per constrained step spent filling, applying and advancing logits processors
    (grammar masks); None before any constrained step."""
    dtype: str | None = None
    """What the model and its KV cache run in (``dtype="auto"``: decided by device and CPU)."""
    dtype_reason: str | None = None
    """Why that dtype (e.g. which bf16 matrix units the CPU has, or lacks)."""
    attention_backend: str | None = None
    """The attention backend: ``cpu`` (the C decode kernel), ``torch`` or ``triton``."""
    attention_reason: str | None = None
    """Why that backend (e.g. the C kernel built, or why it could not be)."""
    cuda_graph_sizes: tuple[int, ...] = ()
    """Decode batch sizes that replay a captured CUDA graph; empty: every step runs eagerly (CPU,
    ``enforce_eager``, or an attention backend that plans on the host)."""
    async_scheduling: bool = False
    """Whether each step is scheduled and launched while the one before it runs (``async_scheduling``;
    by default on CUDA only)."""


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class StatsCollector:
    """Rolling latency samples (last ``max_samples`` requests) and recent token counts."""

    def __init__(self, max_samples: int = 1000, window_s: float = 10.0) -> None:
        self.ttft: deque[float] = deque(maxlen=max_samples)
        self.tpot: deque[float] = deque(maxlen=max_samples)
        self.window_s = window_s
        self._tokens: deque[tuple[float, int]] = deque()
        self._started = time.monotonic()

    def record_tokens(self, n: int) -> None:
        now = time.monotonic()
        self._tokens.append((now, n))
        while self._tokens and self._tokens[0][0] < now - self.window_s:
            self._tokens.popleft()

    def record_finished(self, ttft: float | None, total: float | None, num_tokens: int) -> None:
        if ttft is not None:
            self.ttft.append(ttft)
            if total is not None and num_tokens > 1:
                self.tpot.append((total - ttft) / (num_tokens - 1))

    def tokens_per_s(self) -> float:
        """Over the last ``window_s`` seconds, or since the engine started if that is sooner."""
        now = time.monotonic()
        recent = sum(n for t, n in self._tokens if t >= now - self.window_s)
        return recent / max(1e-3, min(self.window_s, now - self._started))


def build_stats(
    last: EngineSnapshot | None, num_submitted: int, collector: StatsCollector, healthy: bool,
    error: BaseException | None,
) -> EngineStats:
    """``last`` is the latest step's snapshot; ``num_submitted`` sequences are not yet handed over."""
    ttft, tpot = list(collector.ttft), list(collector.tpot)
    kv = last.kv_stats if last else None
    return EngineStats(
        healthy=healthy,
        num_running=last.num_running if last else 0,
        num_waiting=(last.num_waiting if last else 0) + num_submitted,
        kv_blocks_used=kv.used_blocks if kv else 0,
        kv_blocks_total=kv.num_blocks if kv else 0,
        num_preemptions=last.num_preemptions if last else 0,
        num_timeouts=last.num_timeouts if last else 0,
        prefix_cache_hit_rate=kv.hit_rate if kv else 0.0,
        tokens_per_s=collector.tokens_per_s(),
        ttft_p50=percentile(ttft, 0.5),
        ttft_p99=percentile(ttft, 0.99),
        tpot_p50=percentile(tpot, 0.5),
        tpot_p99=percentile(tpot, 0.99),
        error=repr(error) if error is not None else None,
        logits_processor_ms_per_step=(
            1e3 * last.processor_time_s / last.num_constrained_steps if last and last.num_constrained_steps else None
        ),
    )

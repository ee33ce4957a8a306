"""``engine.stats()``: queue sizes, KV usage and latency percentiles, kept on the event loop.

Constrained decoding has its own breakdown, to tell a slow grammar from a slow step: the mean,
p99 and max time per constrained step in logits processors (mask fill, apply, accepts), the
p50/p99/max wall time of those same steps (forward, sampling, processors), and the grammar
compiles (count, mean and max time from submission to result: what the first request of a new
grammar waits). Percentiles and maxima of steps are over the last 1000 constrained steps.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvloom.engine.percentile import percentile

if TYPE_CHECKING:
    from kvloom.engine.messages import EngineSnapshot
    from kvloom.structured.timing import CompileSummary


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
    logits_processor_ms_p99: float | None = None
    """p99 of the same per-step time over the last 1000 constrained steps; None before any."""
    logits_processor_ms_max: float | None = None
    """Its maximum over the last 1000 constrained steps; None before any."""
    constrained_step_ms_p50: float | None = None
    """Median wall time of those constrained steps, forward to accepts: next to the processor
    times, it tells whether a slow constrained step was the grammar's doing. A step that prefills
    a prompt and samples its first token counts too (the maximum is often one). None before any."""
    constrained_step_ms_p99: float | None = None
    constrained_step_ms_max: float | None = None
    num_grammar_compiles: int = 0
    """Grammar compiles run so far (cache hits are none; ``tools`` requests compile a structural tag)."""
    grammar_compile_ms_mean: float | None = None
    """Mean time of a compile from submission to result, queueing in the compile pool included:
    what the first request of a grammar waits for it. None before any compile."""
    grammar_compile_ms_max: float | None = None
    dtype: str | None = None
    """What the model and its KV cache run in (``dtype="auto"``: decided by device and CPU)."""
    dtype_reason: str | None = None
    """Why that dtype (e.g. which bf16 matrix units the CPU has, or lacks)."""
    kv_cache_dtype: str | None = None
    """What the KV cache holds: the model's dtype, or ``int8`` (``kv_cache_dtype="int8"``)."""
    weights: str | None = None
    """How the linear weights are held: ``int8`` (``quantization="int8"``), ``onednn-packed``, ``input-major``
    or ``row-major`` (``layers.weight_layout``)."""
    weights_reason: str | None = None
    """Why (the setting, or what the CPU and torch can do)."""
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
    error: BaseException | None, compiles: CompileSummary | None = None,
) -> EngineStats:
    """``last`` is the latest step's snapshot; ``num_submitted`` sequences are not yet handed over;
    ``compiles`` are the grammar compiles so far (None: the engine has no grammar service)."""
    ttft, tpot = list(collector.ttft), list(collector.tpot)
    kv = last.kv_stats if last else None
    sample = last.constrained_step_times if last else None
    processor = [1e3 * s for s in sample.processor_s] if sample else []
    step = [1e3 * s for s in sample.step_s] if sample else []
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
        logits_processor_ms_p99=percentile(processor, 0.99),
        logits_processor_ms_max=max(processor, default=None),
        constrained_step_ms_p50=percentile(step, 0.5),
        constrained_step_ms_p99=percentile(step, 0.99),
        constrained_step_ms_max=max(step, default=None),
        num_grammar_compiles=compiles.num_compiles if compiles else 0,
        grammar_compile_ms_mean=1e3 * compiles.total_s / compiles.num_compiles if compiles and compiles.num_compiles
        else None,
        grammar_compile_ms_max=1e3 * compiles.max_s if compiles and compiles.num_compiles else None,
    )

"""Optional Prometheus export (``pip install kvloom[prometheus]``): a collector that reads
``engine.stats()`` at scrape time, so serving pays nothing between scrapes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from kvloom.engine.stats import EngineStats


class EngineStatsCollector:
    """A ``prometheus_client`` custom collector over a ``stats()`` callable."""

    def __init__(self, stats: Callable[[], EngineStats], prefix: str = "kvloom") -> None:
        self._stats = stats
        self._prefix = prefix

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        s = self._stats()
        values: dict[str, tuple[str, float | None]] = {
            "healthy": ("1 if the engine is serving", float(s.healthy)),
            "requests_running": ("requests in the running batch", s.num_running),
            "requests_waiting": ("requests waiting for a slot", s.num_waiting),
            "kv_blocks_used": ("KV cache blocks in use", s.kv_blocks_used),
            "kv_blocks_total": ("KV cache blocks in the pool", s.kv_blocks_total),
            "preemptions": ("requests preempted so far", s.num_preemptions),
            "tokens_per_second": ("output tokens per second, recent window", s.tokens_per_s),
            "ttft_p50_seconds": ("time to first token, median", s.ttft_p50),
            "ttft_p99_seconds": ("time to first token, p99", s.ttft_p99),
            "tpot_p50_seconds": ("time per output token, median", s.tpot_p50),
            "tpot_p99_seconds": ("time per output token, p99", s.tpot_p99),
        }
        for name, (doc, value) in values.items():
            if value is not None:
                yield GaugeMetricFamily(f"{self._prefix}_{name}", doc, value=float(value))


def register_prometheus(stats: Callable[[], EngineStats], registry: Any = None, prefix: str = "kvloom") -> Any:
    """Register a collector for ``stats`` (e.g. ``engine.stats``) in ``registry`` (default: the global one)."""
    from prometheus_client import REGISTRY

    collector = EngineStatsCollector(stats, prefix)
    (registry if registry is not None else REGISTRY).register(collector)
    return collector

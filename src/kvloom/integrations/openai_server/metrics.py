"""``GET /metrics``: the engine's Prometheus gauges (``AsyncEngine.register_prometheus``) in the
text exposition format.

Each app has its own registry, built at the first scrape, so several apps in one process (or
an app next to the application's own ``prometheus_client`` metrics) never clash over names.
The collector reads ``engine.stats()`` at scrape time, on the event loop (the route is async,
so it never runs in a worker thread). Without ``prometheus-client`` (the ``prometheus`` extra)
the route answers 501 in OpenAI's error shape, naming the extra: a scrape then fails with the
reason in its body, where a missing route would be a bare 404.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from kvloom.engine.async_engine import AsyncEngine
from kvloom.integrations.openai_server.errors import OpenAIError

PROMETHEUS_EXTRA = "pip install 'kvloom[prometheus]'"


class _Exporter:
    """The engine's collector in a registry of its own, created once, at the first scrape."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._registry: Any = None

    def scrape(self) -> Response:
        try:
            from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        except ImportError as exc:
            raise OpenAIError(501, f"/metrics needs prometheus-client: {PROMETHEUS_EXTRA} ({exc})",
                              type="server_error", code="metrics_unavailable") from exc
        if self._registry is None:
            registry = CollectorRegistry()
            self._engine.register_prometheus(registry)
            self._registry = registry
        return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)


def build_metrics_router(engine: AsyncEngine) -> APIRouter:
    router = APIRouter()
    exporter = _Exporter(engine)

    @router.get("/metrics", response_model=None)
    async def metrics() -> Response:
        """The engine's gauges (``kvloom_healthy``, ``kvloom_requests_running``, ...)."""
        return exporter.scrape()

    return router

"""``GET /metrics``: the engine's Prometheus gauges in the text exposition format, a registry
per app (two apps over one engine in one process both serve them), and a 501 in OpenAI's
error shape, naming the extra to install, where prometheus-client is missing."""

from __future__ import annotations

import sys

import httpx2
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from kvloom import AsyncEngine
from kvloom.integrations.openai_server import create_app
from tests.integrations.openai_server.conftest import MODEL, client_for, user

pytestmark = pytest.mark.asyncio(loop_scope="package")


async def scrape(app: FastAPI) -> httpx2.Response:
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test") as http:
        return await http.get("/metrics")


async def test_metrics_are_the_engine_gauges_in_prometheus_text_format(app: FastAPI, engine: AsyncEngine) -> None:
    await client_for(app).chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
    response = await scrape(app)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=")
    gauges = {family.name: family.samples[0].value for family in text_string_to_metric_families(response.text)
              if family.type == "gauge"}
    stats = engine.stats()
    assert gauges["kvloom_healthy"] == 1.0
    assert gauges["kvloom_kv_blocks_total"] == stats.kv_blocks_total > 0
    assert gauges["kvloom_requests_running"] == 0 and gauges["kvloom_requests_waiting"] == 0
    assert "kvloom_ttft_p50_seconds" in gauges  # a request has run: latency gauges exist
    assert (await scrape(app)).status_code == 200  # the registry is built once, not on every scrape


async def test_two_apps_over_one_engine_both_serve_metrics(app: FastAPI, engine: AsyncEngine) -> None:
    second = create_app(engine, model_name=MODEL)
    for served in (app, second):
        response = await scrape(served)
        assert response.status_code == 200 and "kvloom_healthy 1.0" in response.text


async def test_metrics_without_prometheus_client_are_a_501_naming_the_extra(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed: importing it fails
    response = await scrape(create_app(engine, model_name=MODEL))
    assert response.status_code == 501
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "metrics_unavailable"
    assert "pip install 'kvloom[prometheus]'" in error["message"]

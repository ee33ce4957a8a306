"""The OpenAI-compatible app on the demo model, driven by the official ``openai`` client.

The client talks to the app in-process (``httpx2.ASGITransport``); the app's lifespan runs as
a server runs it, so the app owns its engine. One app (and one event loop) serves the whole
package: every test marks itself ``asyncio(loop_scope="package")``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import pytest_asyncio
from fastapi import FastAPI

from kvloom import AsyncEngine
from kvloom.integrations.openai_server import create_app

MODEL = "demo"
ADAPTER = "tenant"


@pytest.fixture(scope="session")
def adapter_path(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random rank-8 LoRA for the demo model, in PEFT's on-disk format."""
    from kvloom.lora.synthetic import write_random_adapter
    from kvloom.models.config import load_model_config

    return write_random_adapter(tmp_path_factory.mktemp("lora"), load_model_config(demo_dir), r=8, alpha=16.0)


def client_for(app: FastAPI) -> openai.AsyncOpenAI:
    """The official client, in-process; no retries (a 429 must reach the test)."""
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0)


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def app(demo_dir: Path, adapter_path: Path) -> AsyncIterator[FastAPI]:
    app = create_app(demo_dir, model_name=MODEL, adapters={ADAPTER: adapter_path}, max_loras=2, max_lora_rank=8)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
def engine(app: FastAPI) -> AsyncEngine:
    engine: AsyncEngine = app.state.kvloom_engine
    return engine


@pytest.fixture
def client(app: FastAPI) -> openai.AsyncOpenAI:
    return client_for(app)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def prompt_len(engine: AsyncEngine, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
    """How many tokens the chat template makes of ``messages`` (and ``tools``), as kvloom renders them."""
    assert engine.tokenizer is not None
    ids = engine.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

"""``create_app``: an OpenAI-compatible FastAPI app over one ``AsyncEngine``.

Given a model directory, the app owns its engine: its lifespan loads the model (off the event
loop), loads the named LoRA adapters, and closes the engine at shutdown. Given an engine, the
app only serves it: the lifespan starts it if needed and never closes it, so an application
can share the engine with its own routes, or mount this app under its own (a mounted app's
lifespan does not run: start the engine in the parent's lifespan, see
``examples/openai_server.py``).

``app.state.kvloom_engine`` is the engine; ``app.state.kvloom_in_flight`` the requests being
answered (``InFlight``: a server shutting down aborts them, see ``server.GracefulServer``).
``GET /metrics`` serves the engine's Prometheus gauges (``metrics.py``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from kvloom.engine.async_engine import AsyncEngine
from kvloom.integrations.openai_server.errors import install_handlers
from kvloom.integrations.openai_server.metrics import build_metrics_router
from kvloom.integrations.openai_server.routes import Served, build_router


def create_app(
    model: AsyncEngine | str | Path, *, model_name: str | None = None,
    adapters: Mapping[str, str | Path] | None = None, **engine_config: Any,
) -> FastAPI:
    """The app for ``model`` (a checkpoint directory, or an ``AsyncEngine``).

    ``model_name`` is what clients pass as ``model`` for the base model (default: the
    checkpoint directory's name); ``adapters`` (name -> PEFT LoRA directory) are loaded at
    startup and served under their names. ``engine_config`` goes to
    ``AsyncEngine.from_pretrained`` (``max_waiting``, ``max_loras``, ``request_timeout``, ...)
    and is refused with an engine, which is already configured.
    """
    if isinstance(model, AsyncEngine):
        if engine_config:
            raise ValueError(f"create_app: engine settings ({', '.join(sorted(engine_config))}) go to the "
                             "AsyncEngine you pass, not to create_app")
        engine, owned = model, False
    else:
        engine, owned = AsyncEngine.from_pretrained(model, **engine_config), True
    served = Served(engine, model_name or Path(engine.config.model).name, int(time.time()))
    to_load = dict(adapters or {})

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            for name, path in to_load.items():
                await engine.load_adapter(name, path)
            yield
        finally:
            if owned:
                await engine.aclose()

    app = FastAPI(title="kvloom OpenAI-compatible API", lifespan=lifespan)
    app.state.kvloom_engine = engine
    app.state.kvloom_in_flight = served.in_flight
    install_handlers(app)
    app.include_router(build_router(served))
    app.include_router(build_metrics_router(engine))
    return app

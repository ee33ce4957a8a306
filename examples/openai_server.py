"""An OpenAI-compatible server in your own FastAPI app, for any OpenAI client.

Run: python examples/openai_server.py [--model DIR] [--port 8000] [--mounted]
Then: curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "demo", "messages": [{"role": "user", "content": "Hi!"}]}'
or    openai.OpenAI(base_url="http://localhost:8000/v1", api_key="unused")

Without --model it serves the shipped demo model (5M parameters, trained on a
synthetic corpus: general questions get simple, often nonsensical answers). Two ways to
use the app: as is, where its lifespan loads the engine and closes it at shutdown (add your own
routes to it), or --mounted under your own app, whose lifespan then owns the engine (a mounted
app's lifespan does not run) and shares it with your routes.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from kvloom import AsyncEngine, SamplingParams
from kvloom.integrations.openai_server import create_app


def standalone(model: Path) -> FastAPI:
    """The app owns its engine; your routes go on it like on any FastAPI app."""
    app = create_app(model, model_name="demo", max_num_seqs=32)

    @app.get("/stats")
    async def stats() -> dict[str, float]:
        s = app.state.kvloom_engine.stats()
        return {"running": s.num_running, "waiting": s.num_waiting, "tokens_per_s": s.tokens_per_s}

    return app


def mounted(model: Path) -> FastAPI:
    """Your app owns the engine; the OpenAI API lives under /openai/v1 next to your own routes."""
    engine = AsyncEngine.from_pretrained(model, max_num_seqs=32)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with engine:  # loads the model off the event loop; closes it at shutdown
            yield

    app = FastAPI(lifespan=lifespan)
    app.mount("/openai", create_app(engine, model_name="demo"))

    @app.get("/summarize")
    async def summarize(text: str) -> dict[str, str]:
        out = await engine.generate(messages=[{"role": "user", "content": f"Summarize: {text}"}],
                                    params=SamplingParams(max_tokens=64))
        return {"summary": out.text}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a HF checkpoint directory (default: the demo model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--mounted", action="store_true", help="mount the API under /openai in a parent app")
    args = parser.parse_args()
    if args.model is None:
        from kvloom.demo import demo_model_dir

        args.model = demo_model_dir()  # built once into the cache
    app = mounted(args.model) if args.mounted else standalone(args.model)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()

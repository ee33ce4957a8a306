"""An OpenAI-compatible HTTP app (FastAPI) over an ``AsyncEngine``: ``create_app(model_dir)``.

Needs the ``server`` extra (``pip install kvloom[server]``). ``python -m kvloom serve`` runs it
with uvicorn.
"""

try:  # first, so that without the extra the error says which one to install
    import fastapi  # noqa: F401
except ModuleNotFoundError as exc:
    raise ModuleNotFoundError(
        f"kvloom.integrations.openai_server needs FastAPI: pip install 'kvloom[server]' ({exc})", name=exc.name,
    ) from exc

from kvloom.integrations.openai_server.app import create_app

__all__ = ["create_app"]

"""An OpenAI-compatible HTTP app (FastAPI) over an ``AsyncEngine``: ``create_app(model_dir)``.

Needs the ``server`` extra (``pip install kvloom[server]``). ``python -m kvloom serve`` runs it
with uvicorn.
"""

from kvloom.integrations.openai_server.app import create_app

__all__ = ["create_app"]

"""The held-out sample of the shipped model, run once per session and shared by its tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_eval() -> object:
    """24 held-out examples per task through a float32 engine on the shipped model (a ``Report``)."""
    from kvloom.demo_model.evaluate import evaluate
    from kvloom.demo_model.shipped import shipped_model_dir

    return evaluate(shipped_model_dir(), per_task=24, perplexity=False, dtype="float32")

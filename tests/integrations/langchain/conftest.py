"""Engines for the LangChain tests, each loaded once with one LoRA adapter (so that ``model=<adapter
name>`` at call time has something to select): ``demo_runtime`` on the random-weight test checkpoint
(scripted replies, cut outputs), ``trained_runtime`` on the trained demo model (LangChain's standard
integration suite, which judges what the model writes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvloom.integrations.runtime import EngineRuntime

ADAPTER = "tenant-a"
"""A random rank-8 LoRA adapter loaded into the shared engine under this name."""


def _runtime(model_dir: Path, lora_dir: Path) -> EngineRuntime:
    from kvloom.lora.synthetic import write_random_adapter
    from kvloom.models.config import load_model_config

    adapter = write_random_adapter(lora_dir, load_model_config(model_dir), r=8, alpha=16.0)
    runtime = EngineRuntime(model_dir, max_loras=2, max_lora_rank=8)
    runtime.start()
    runtime.run(lambda engine: engine.load_adapter(ADAPTER, adapter))
    return runtime


@pytest.fixture(scope="session")
def demo_runtime(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineRuntime]:
    """The random-weight demo-shaped checkpoint's engine, started once on the runtime's own thread."""
    runtime = _runtime(demo_dir, tmp_path_factory.mktemp("lora"))
    yield runtime
    runtime.close()


@pytest.fixture(scope="session")
def trained_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineRuntime]:
    """The trained demo model's engine (``kvloom.demo_model``), started once."""
    from kvloom.demo_model.shipped import shipped_model_dir

    runtime = _runtime(shipped_model_dir(), tmp_path_factory.mktemp("lora-trained"))
    yield runtime
    runtime.close()

"""One demo-model engine for every LangChain test, loaded once, with one LoRA adapter loaded
(so that ``model=<adapter name>`` at call time has something to select)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvloom.integrations.runtime import EngineRuntime

ADAPTER = "tenant-a"
"""A random rank-8 LoRA adapter loaded into the shared engine under this name."""


@pytest.fixture(scope="session")
def demo_runtime(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineRuntime]:
    """The demo checkpoint's engine, started once on the runtime's own thread."""
    from kvloom.lora.synthetic import write_random_adapter
    from kvloom.models.config import load_model_config

    adapter = write_random_adapter(tmp_path_factory.mktemp("lora"), load_model_config(demo_dir), r=8, alpha=16.0)
    runtime = EngineRuntime(demo_dir, max_loras=2, max_lora_rank=8)
    runtime.start()
    runtime.run(lambda engine: engine.load_adapter(ADAPTER, adapter))
    yield runtime
    runtime.close()

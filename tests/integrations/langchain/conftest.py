"""One demo-model engine for every LangChain test, loaded once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvloom.integrations.runtime import EngineRuntime


@pytest.fixture(scope="session")
def demo_runtime(demo_dir: Path) -> Iterator[EngineRuntime]:
    """The demo checkpoint's engine, started once on the runtime's own thread."""
    runtime = EngineRuntime(demo_dir)
    runtime.start()
    yield runtime
    runtime.close()


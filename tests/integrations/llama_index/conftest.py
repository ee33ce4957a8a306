"""One demo-model engine for the LlamaIndex tests: ``llm`` owns it (its own thread and loop),
so sync tests and async tests (each on its own event loop) share it; greedy by default."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvloom.integrations.llama_index import KVLoomLLM


@pytest.fixture(scope="package")
def llm(demo_dir: Path) -> Iterator[KVLoomLLM]:
    owned = KVLoomLLM(demo_dir, temperature=0.0, max_tokens=16)
    yield owned
    owned.close()


@pytest.fixture
def sibling(llm: KVLoomLLM) -> KVLoomLLM:
    """Another ``KVLoomLLM`` on ``llm``'s (started) engine, for settings of its own."""
    engine = llm.runtime.start()
    return KVLoomLLM(engine=engine, temperature=0.0, max_tokens=16)

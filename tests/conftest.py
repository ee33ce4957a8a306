"""Session-wide fixtures: tiny real HF checkpoints built locally (random weights, trained tokenizer)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``factory(arch="llama", **overrides) -> Path``; each distinct spec is built once per session."""
    from kvloom.models.tiny import build_checkpoint

    built: dict[str, Path] = {}

    def factory(**spec: object) -> Path:
        key = repr(sorted(spec.items()))
        if key not in built:
            out = tmp_path_factory.mktemp(str(spec.get("arch", "llama")))
            built[key] = build_checkpoint(out, **spec)  # type: ignore[arg-type]
        return built[key]

    return factory


@pytest.fixture(scope="session")
def llama_dir(checkpoint_factory: Callable[..., Path]) -> Path:
    return checkpoint_factory(arch="llama")

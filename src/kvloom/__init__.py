"""kvloom: serve LLMs inside your Python application.

Public API: ``LLM`` (synchronous facade), ``SamplingParams``, ``Completion`` and friends.
Heavy modules (torch, transformers) load on first use, not at ``import kvloom``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvloom.errors import (
    CheckpointError,
    ConfigError,
    InvalidRequestError,
    KvloomError,
    UnsupportedModelError,
)
from kvloom.outputs import Choice, Completion, TokenLogprob, Usage
from kvloom.params import SamplingParams

if TYPE_CHECKING:
    from kvloom.config import EngineConfig
    from kvloom.engine.llm import LLM

__all__ = [
    "LLM",
    "CheckpointError",
    "Choice",
    "Completion",
    "ConfigError",
    "EngineConfig",
    "InvalidRequestError",
    "KvloomError",
    "SamplingParams",
    "TokenLogprob",
    "UnsupportedModelError",
    "Usage",
]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from kvloom.engine.llm import LLM

        return LLM
    if name == "EngineConfig":
        from kvloom.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'kvloom' has no attribute {name!r}")

"""kvloom: serve LLMs inside your Python application.

Public API: ``AsyncEngine`` (streams in your event loop), ``LLM`` (synchronous facade), ``SamplingParams``, ``Completion`` and friends.
Heavy modules (torch, transformers) load on first use, not at ``import kvloom``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvloom.errors import (
    CheckpointError,
    ConfigError,
    EngineClosedError,
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    GrammarError,
    InvalidRequestError,
    KvloomError,
    PrefixBudgetError,
    RequestTimeoutError,
    UnsupportedModelError,
)
from kvloom.outputs import Choice, Completion, IncompleteToolCallError, StreamChunk, TokenLogprob, Usage
from kvloom.params import SamplingParams

if TYPE_CHECKING:
    from kvloom.config import EngineConfig
    from kvloom.engine.async_engine import AsyncEngine
    from kvloom.engine.llm import LLM

__all__ = [
    "LLM",
    "AsyncEngine",
    "CheckpointError",
    "Choice",
    "Completion",
    "ConfigError",
    "EngineClosedError",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "EngineOverloadedError",
    "GrammarError",
    "IncompleteToolCallError",
    "InvalidRequestError",
    "KvloomError",
    "PrefixBudgetError",
    "RequestTimeoutError",
    "SamplingParams",
    "StreamChunk",
    "TokenLogprob",
    "UnsupportedModelError",
    "Usage",
]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from kvloom.engine.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from kvloom.engine.async_engine import AsyncEngine

        return AsyncEngine
    if name == "EngineConfig":
        from kvloom.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'kvloom' has no attribute {name!r}")

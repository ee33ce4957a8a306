"""Adapters built from a model directory, never started, then called concurrently: every first
call succeeds and the model loads once (LangChain's own integration suite calls ``batch`` /
``abatch`` this way; before, 3 of 4 such calls raised EngineClosedError)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvloom.engine.lifecycle import EngineLifecycle
from kvloom.integrations.langchain import ChatKVLoom
from kvloom.integrations.llama_index import KVLoomLLM


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts model loads (one entry per ``EngineLifecycle._load``) in this test."""
    counted: list[int] = []
    real = EngineLifecycle._load

    def counting(self: EngineLifecycle):  # type: ignore[no-untyped-def]
        counted.append(1)
        return real(self)

    monkeypatch.setattr(EngineLifecycle, "_load", counting)
    return counted


def test_langchain_batch_on_a_fresh_model(demo_dir: Path, loads: list[int]) -> None:
    chat = ChatKVLoom(model_path=str(demo_dir), max_tokens=4, temperature=0.0)
    try:
        replies = chat.batch(["Hello", "Hey", "Hi there", "Good morning"])
        assert len(replies) == 4 and all(r.response_metadata["finish_reason"] for r in replies)
        assert sum(loads) == 1
    finally:
        chat.close()


def test_a_fresh_langchain_model_still_deep_copies(demo_dir: Path) -> None:
    """The lock that makes its runtime once is replaced in a copy, not copied (a lock can't be)."""
    chat = ChatKVLoom(model_path=str(demo_dir), max_tokens=4)
    twin = chat.model_copy(deep=True)
    assert twin.model_path == chat.model_path and twin._runtime is None


def test_langchain_abatch_on_a_fresh_model(demo_dir: Path, loads: list[int]) -> None:
    chat = ChatKVLoom(model_path=str(demo_dir), max_tokens=4, temperature=0.0)
    try:
        replies = asyncio.run(chat.abatch(["Hello", "Hey", "Hi there"]))
        assert len(replies) == 3
        assert sum(loads) == 1
    finally:
        chat.close()


def test_llama_index_gathered_first_acompletes(demo_dir: Path, loads: list[int]) -> None:
    llm = KVLoomLLM(model_path=str(demo_dir), max_tokens=4, temperature=0.0)

    async def first_calls() -> list[str]:
        return [r.text for r in await asyncio.gather(*(llm.acomplete(p) for p in ("a", "b", "c", "d")))]

    try:
        assert len(asyncio.run(first_calls())) == 4
        assert sum(loads) == 1
    finally:
        llm.close()

"""Incremental detokenization: no broken UTF-8 in any delta, deltas add up, stop strings held back."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvloom.engine.detokenizer import IncrementalDetokenizer
from kvloom.engine.tokenizer import load_tokenizer

TEXT = "Café ünïcode ✓ — 日本語 and emoji 🚀 done."


@pytest.fixture(scope="module")
def tokenizer(llama_dir: Path) -> object:
    return load_tokenizer(llama_dir)


def test_multibyte_characters_are_never_split_across_deltas(tokenizer: object) -> None:
    ids = tokenizer.encode(TEXT)  # type: ignore[attr-defined]
    assert len(ids) > len(TEXT.encode()) // 2, "byte-level pieces: many characters span several tokens"
    detok = IncrementalDetokenizer(tokenizer, [0])  # type: ignore[arg-type]
    deltas = []
    for token in ids:
        detok.add_tokens([token])
        delta = detok.take_delta(final=False)
        assert "\ufffd" not in delta
        deltas.append(delta)
    deltas.append(detok.take_delta(final=True))
    assert "".join(deltas) == TEXT == tokenizer.decode(ids)  # type: ignore[attr-defined]


@pytest.mark.parametrize("stop", ["ünï", "✓ —", "done"])
def test_stop_string_split_over_tokens_is_found_and_never_streamed(tokenizer: object, stop: str) -> None:
    ids = tokenizer.encode(TEXT)  # type: ignore[attr-defined]
    detok = IncrementalDetokenizer(tokenizer, [0], stop=[stop])  # type: ignore[arg-type]
    streamed = ""
    for token in ids:
        detok.add_tokens([token])
        streamed += detok.take_delta(final=detok.stopped)
        if detok.stopped:
            break
    assert detok.stopped
    assert streamed == TEXT[: TEXT.index(stop)]

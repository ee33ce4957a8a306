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


class _DecodeOnly:
    """The tokenizer seen only through ``decode``: forces the pure-Python incremental path."""

    def __init__(self, tokenizer: object) -> None:
        self._inner = tokenizer

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._inner.decode(token_ids, skip_special_tokens=skip_special_tokens)  # type: ignore[attr-defined,no-any-return]


def test_the_rust_decode_stream_and_the_python_fallback_give_the_same_text(tokenizer: object) -> None:
    import random

    rng = random.Random(0)
    vocab = len(tokenizer)  # type: ignore[arg-type]
    prompt = tokenizer.encode("Context: ünï")  # type: ignore[attr-defined]
    for trial in range(40):
        ids = tokenizer.encode(TEXT) if trial == 0 else [rng.randrange(vocab) for _ in range(30)]  # type: ignore[attr-defined]
        fast = IncrementalDetokenizer(tokenizer, prompt)  # type: ignore[arg-type]
        slow = IncrementalDetokenizer(_DecodeOnly(tokenizer), prompt)  # type: ignore[arg-type]
        assert fast._stream is not None and slow._stream is None
        for token in ids:
            fast.add_tokens([token])
            slow.add_tokens([token])
            assert fast.text == slow.text

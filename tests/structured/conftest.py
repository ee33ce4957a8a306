"""Fixtures of the grammar tests: the tiny tokenizer and its vocabulary, built once per session."""

from __future__ import annotations

from typing import Any

import pytest

from kvloom.structured.vocab import TokenizerVocab

TINY_VOCAB_SIZE = 768
TINY_EOS_IDS = (1, 4)  # <|eos|> and <|im_end|>, as the engine passes them


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    from kvloom.models.tiny import train_tokenizer

    return train_tokenizer(TINY_VOCAB_SIZE)


@pytest.fixture(scope="session")
def tiny_vocab(tiny_tokenizer: Any) -> TokenizerVocab:
    """The tiny tokenizer's vocabulary with logits exactly as wide as the tokenizer."""
    return TokenizerVocab.from_tokenizer(tiny_tokenizer, len(tiny_tokenizer), TINY_EOS_IDS)

"""TokenizerVocab: token bytes from the raw vocabulary, for byte-level and sentencepiece-style tokenizers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvloom.structured.vocab import TokenizerVocab, detect_vocab_kind

TEXTS = ['héllo wörld {"a": 1}', "日本語 😀 tabs\tand\nnewlines", "  two  spaces, ✓ done."]


def _metaspace_tokenizer() -> Any:
    """A Llama-2-style BPE: Metaspace pre-tokenizer, ``<0xNN>`` byte fallback, trained on ASCII only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    corpus = ["hello world, this is a test of the tokenizer", 'json {"a": 1, "b": [true, false, null]}'] * 20
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    # The trainer does not add byte-fallback tokens: append <0x00>..<0xFF> to the vocabulary.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    first = len(vocab)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = first + byte
    return Tokenizer.from_str(json.dumps(spec))


def _concat(vocab: TokenizerVocab, ids: list[int]) -> bytes:
    pieces = [vocab.token_bytes[i] for i in ids]
    assert all(p is not None for p in pieces), "an encoded text token has no bytes"
    return b"".join(p for p in pieces if p is not None)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_token_bytes_concatenate_to_the_text(tiny_tokenizer: Any, text: str) -> None:
    vocab = TokenizerVocab.from_tokenizer(tiny_tokenizer, len(tiny_tokenizer), (1, 4))
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert _concat(vocab, ids) == text.encode("utf-8")


def test_byte_level_special_tokens_have_no_bytes_and_every_byte_has_a_token(tiny_tokenizer: Any) -> None:
    vocab = TokenizerVocab.from_tokenizer(tiny_tokenizer, len(tiny_tokenizer), (1, 4))
    assert vocab.token_bytes[:5] == [None] * 5  # bos, eos, pad, <|im_start|>, <|im_end|>
    singles = {b for b in vocab.token_bytes if b is not None and len(b) == 1}
    assert singles == {bytes([i]) for i in range(256)}
    # A merged byte-level token: "Ġ" stands for a space.
    assert b" the" in vocab.token_bytes


@pytest.mark.parametrize("text", TEXTS)
def test_metaspace_byte_fallback_token_bytes_concatenate_to_the_text(text: str) -> None:
    tok = _metaspace_tokenizer()
    vocab = TokenizerVocab.from_tokenizer(tok, tok.get_vocab_size() + 7, (2,))
    encoding = tok.encode(text, add_special_tokens=False)
    assert any(t.startswith("<0x") for t in encoding.tokens)  # the non-ASCII text used byte fallback
    # prepend_scheme="first": the tokenizer itself puts "▁" before a text that does not start
    # with a space (its decoder strips it again).
    expected = text if text.startswith(" ") else " " + text
    assert _concat(vocab, encoding.ids) == expected.encode("utf-8")


def test_metaspace_vocab_maps_the_visible_space_and_byte_tokens() -> None:
    tok = _metaspace_tokenizer()
    vocab = TokenizerVocab.from_tokenizer(tok, tok.get_vocab_size(), (2,))
    assert detect_vocab_kind(json.loads(tok.to_str())) == ("metaspace", True)
    ids = tok.get_vocab()
    assert vocab.token_bytes[ids["<0x0A>"]] == b"\n"
    assert vocab.token_bytes[ids["<0xC3>"]] == b"\xc3"
    assert vocab.token_bytes[ids["▁"]] == b" "
    assert [vocab.token_bytes[ids[t]] for t in ("<unk>", "<s>", "</s>")] == [None, None, None]


def test_padded_width_and_eos(tiny_tokenizer: Any) -> None:
    size = len(tiny_tokenizer)
    vocab = TokenizerVocab.from_tokenizer(tiny_tokenizer, size + 50, (1, 4))
    assert len(vocab.token_bytes) == size and vocab.vocab_width == size + 50
    assert vocab.eos_token_ids == (1, 4)
    narrow = TokenizerVocab.from_tokenizer(tiny_tokenizer, size - 10, (1, 4))  # ids past the logits are dropped
    assert len(narrow.token_bytes) == size - 10


def test_fingerprint_is_stable_and_tracks_the_content(tiny_tokenizer: Any) -> None:
    size = len(tiny_tokenizer)
    a = TokenizerVocab.from_tokenizer(tiny_tokenizer, size, (1, 4))
    b = TokenizerVocab.from_tokenizer(tiny_tokenizer, size, (1, 4))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert TokenizerVocab.from_tokenizer(tiny_tokenizer, size + 1, (1, 4)).fingerprint != a.fingerprint
    assert TokenizerVocab.from_tokenizer(tiny_tokenizer, size, (1,)).fingerprint != a.fingerprint
    changed = list(a.token_bytes)
    changed[100] = b"x" + (changed[100] or b"")
    assert TokenizerVocab(changed, size, (1, 4)).fingerprint != a.fingerprint


@pytest.mark.parametrize(
    ("token_bytes", "width", "eos", "message"),
    [
        ([None, b"a", b"b"], 2, (0,), "only 2 wide"),
        ([None, b"a"], 4, (), "at least one EOS"),
        ([None, b"a"], 4, (7,), "outside the logits width"),
        ([None, b"a"], 4, (1,), "must have no bytes"),
        ([None, b""], 4, (0,), "not b''"),
    ],
)
def test_invalid_vocab_is_refused(token_bytes: list[bytes | None], width: int, eos: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenizerVocab(token_bytes, width, eos)


def test_a_slow_tokenizer_is_refused() -> None:
    with pytest.raises(TypeError, match="fast"):
        TokenizerVocab.from_tokenizer(object(), 10, (0,))

"""The tokenizer's vocabulary as raw bytes: what every grammar backend matches tokens against.

Grammars constrain *bytes*, so each token id needs the exact bytes it adds to the output. Those
come from the tokenizer's raw vocabulary, never from ``decode``: decoding a lone byte-level
token that holds half of a UTF-8 character yields ``"\ufffd"``, and sentencepiece decoders strip
the leading space of the first token.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

VocabKind = Literal["byte_level", "metaspace", "raw"]
"""How a tokenizer spells bytes in its vocabulary (see :meth:`TokenizerVocab.from_tokenizer`)."""

_METASPACE = "\u2581"  # "▁", sentencepiece's visible space


@cache
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    char_to_byte = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in char_to_byte.values():
            char_to_byte[chr(256 + shifted)] = b
            shifted += 1
    return char_to_byte


def _byte_fallback(token: str) -> int | None:
    """``"<0x1B>"`` -> ``0x1B``; anything else -> None."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


def _types_in(node: Any) -> set[str]:
    """Every component ``type`` in a tokenizer.json section (``Sequence`` nodes are flattened)."""
    if not isinstance(node, dict):
        return set()
    found = {str(node.get("type"))}
    for key in ("decoders", "pretokenizers", "normalizers"):
        for child in node.get(key) or []:
            found |= _types_in(child)
    return found


def _replaces_metaspace(node: Any) -> bool:
    """True if a decoder section (or a ``Sequence`` of them) replaces ``"▁"`` with a space."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == "Replace" and (node.get("pattern") or {}).get("String") == _METASPACE:
        return True
    return any(_replaces_metaspace(child) for child in node.get("decoders") or [])


def detect_vocab_kind(tokenizer_json: dict[str, Any]) -> tuple[VocabKind, bool]:
    """``(kind, byte_fallback)`` of a parsed ``tokenizer.json``.

    ``byte_level``: a ``ByteLevel`` decoder or pre-tokenizer (GPT-2, Llama 3, Qwen). ``metaspace``:
    a ``Metaspace`` pre-tokenizer/decoder or a decoder replacing ``"▁"`` (Llama 2, Mistral).
    ``raw``: tokens are their own text. ``byte_fallback``: ``<0xNN>`` tokens stand for one byte.
    """
    decoder, pre_tokenizer = tokenizer_json.get("decoder"), tokenizer_json.get("pre_tokenizer")
    types = _types_in(decoder) | _types_in(pre_tokenizer)
    model = tokenizer_json.get("model") or {}
    byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in types
    if "ByteLevel" in types:
        return "byte_level", byte_fallback
    if "Metaspace" in types or _replaces_metaspace(decoder):
        return "metaspace", byte_fallback
    return "raw", byte_fallback


def token_to_bytes(token: str, kind: VocabKind, byte_fallback: bool) -> bytes:
    """The bytes one vocabulary entry (as spelled in ``tokenizer.json``) adds to the text."""
    if byte_fallback and (single := _byte_fallback(token)) is not None:
        return bytes([single])
    if kind == "byte_level":
        table = _byte_level_decoder()
        if all(ch in table for ch in token):
            return bytes(table[ch] for ch in token)
        return token.encode("utf-8")  # not a byte-level spelling (an added token)
    if kind == "metaspace":
        return token.replace(_METASPACE, " ").encode("utf-8")
    return token.encode("utf-8")


@dataclass(frozen=True, eq=False)
class TokenizerVocab:
    """Token id -> bytes, the logits width and the EOS ids: all a grammar backend needs.

    Invariants: ``len(token_bytes) <= vocab_width``; ids at or above ``len(token_bytes)`` (a padded
    ``lm_head``) and ids whose entry is ``None`` (bos/eos/pad/chat markers) are never allowed by a
    grammar; no entry is ``b""``; every EOS id is below ``vocab_width`` and has a ``None`` entry
    (EOS ends the text, it never spells any). ``fingerprint`` identifies the content (sha256
    hex) and is what caches key on; instances compare by identity.
    """

    token_bytes: list[bytes | None]
    """Index = token id; the bytes the token adds to the output, None if it can never appear."""
    vocab_width: int
    """The model's logits width ``V`` (may exceed the tokenizer: padded ``lm_head``)."""
    eos_token_ids: tuple[int, ...]
    """Tokens that end a sequence; a grammar allows them only once its text is complete."""
    fingerprint: str = field(init=False, repr=False)
    """sha256 of ``(vocab_width, eos_token_ids, token_bytes)``."""

    def __post_init__(self) -> None:
        if len(self.token_bytes) > self.vocab_width:
            raise ValueError(
                f"the tokenizer has {len(self.token_bytes)} tokens but the logits are only "
                f"{self.vocab_width} wide"
            )
        if not self.eos_token_ids:
            raise ValueError("a grammar needs at least one EOS token id")
        for eos in self.eos_token_ids:
            if not 0 <= eos < self.vocab_width:
                raise ValueError(f"EOS token id {eos} is outside the logits width {self.vocab_width}")
            if eos < len(self.token_bytes) and self.token_bytes[eos] is not None:
                raise ValueError(f"EOS token id {eos} must have no bytes (None), got {self.token_bytes[eos]!r}")
        if any(b == b"" for b in self.token_bytes):
            raise ValueError("token_bytes must hold non-empty bytes or None, not b''")
        digest = hashlib.sha256()
        digest.update(f"{self.vocab_width}|{list(self.eos_token_ids)}|".encode())
        for b in self.token_bytes:
            # Length-prefixed, so no two different vocabularies hash the same stream.
            digest.update(b"\xff" if b is None else len(b).to_bytes(4, "little") + b)
        object.__setattr__(self, "fingerprint", digest.hexdigest())

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_width: int, eos_token_ids: tuple[int, ...]) -> TokenizerVocab:
        """Build from a fast HF tokenizer (or a ``tokenizers.Tokenizer``), reading its raw vocabulary.

        Byte-level BPE entries map through the inverse of GPT-2's ``bytes_to_unicode``;
        sentencepiece-style entries turn ``"▁"`` into a space and ``<0xNN>`` (byte fallback) into
        that byte. Special added tokens and the EOS ids get ``None``; other added tokens are their
        literal text. ``vocab_width`` is the model's logits width; tokenizer ids at or above it
        can never be sampled and are dropped.
        """
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not hasattr(backend, "to_str") or not hasattr(backend, "get_vocab"):
            raise TypeError(
                f"grammars need a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}"
            )
        kind, byte_fallback = detect_vocab_kind(json.loads(backend.to_str()))
        vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
        added: dict[int, Any] = backend.get_added_tokens_decoder()
        special_ids = {i for i, tok in added.items() if getattr(tok, "special", False)}
        special_ids |= set(getattr(tokenizer, "all_special_ids", ()) or ())
        special_ids |= set(eos_token_ids)
        size = min(max(vocab.values(), default=-1) + 1, vocab_width)
        token_bytes: list[bytes | None] = [None] * size
        for token, token_id in vocab.items():
            if token_id >= size or token_id in special_ids:
                continue
            if token_id in added:  # an added token is its literal content, not a vocab spelling
                data = str(added[token_id].content).encode("utf-8")
            else:
                data = token_to_bytes(token, kind, byte_fallback)
            token_bytes[token_id] = data or None
        return cls(token_bytes, vocab_width, tuple(eos_token_ids))

"""Incremental detokenization with stop strings.

A fast (Rust ``tokenizers``) tokenizer decodes through ``tokenizers``' ``DecodeStream``: one
decode of a short window per token, in Rust. Any other tokenizer decodes the window twice per
token in Python (the prefix/read-offset method); both give the same text.

Deltas never end inside a UTF-8 character (a byte-level token can carry part of one: its
decode ends in U+FFFD until the rest arrives), and stop strings are matched on the text as a
whole, so a stop string split across tokens or chunks is still found. While a request may
still hit a stop string, the last ``max_stop_len - 1`` characters are held back so that a
stop string is never streamed half-way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

# Tokens of context decoded ahead of the new ones: enough for tokenizers whose decode of a
# token depends on its left neighbour (SentencePiece's leading spaces).
_CONTEXT_TOKENS = 5


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def _rust_tokenizer(tokenizer: Tokenizer) -> Any:
    """The ``tokenizers.Tokenizer`` behind a fast HF tokenizer whose ``decode`` adds nothing to it
    (no ``clean_up_tokenization_spaces``), else ``None``."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    try:
        from tokenizers import Tokenizer as RustTokenizer
    except ImportError:
        return None
    return backend if isinstance(backend, RustTokenizer) else None


@dataclass(slots=True)
class IncrementalDetokenizer:
    """Per-sequence decoder. ``text`` is everything decoded so far (stop string cut off)."""

    tokenizer: Tokenizer
    prompt_token_ids: list[int]
    skip_special_tokens: bool = True
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    text: str = ""
    stopped: bool = False
    """A stop string was found; ``text`` ends where the output ends."""
    _ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0
    _emitted: int = 0
    _backend: Any = None
    _stream: Any = None

    def __post_init__(self) -> None:
        self._ids = list(self.prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._backend = _rust_tokenizer(self.tokenizer)
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            # A context ending inside a UTF-8 character (its decode ends in U+FFFD) makes
            # DecodeStream emit the whole context with the first new token: leave those
            # trailing tokens out of the stream's context.
            context = list(self._ids)
            while context and self.tokenizer.decode(context, skip_special_tokens=self.skip_special_tokens).endswith(
                    "\ufffd"):
                context.pop()
            self._stream = DecodeStream(ids=context, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, token_ids: list[int]) -> None:
        """Decode new tokens into ``text``; sets ``stopped`` when a stop string appears."""
        if self.stopped:
            return
        if self._stream is not None:
            for token_id in token_ids:
                piece = self._stream.step(self._backend, token_id)
                if piece:
                    old_len = len(self.text)
                    self.text += piece
                    if self.stop and self._check_stop(old_len):
                        return
            return
        for token_id in token_ids:
            self._ids.append(token_id)
            prefix = self.tokenizer.decode(
                self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self.skip_special_tokens
            )
            full = self.tokenizer.decode(self._ids[self._prefix_offset :], skip_special_tokens=self.skip_special_tokens)
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                old_len = len(self.text)
                self.text += full[len(prefix) :]
                self._prefix_offset = self._read_offset
                self._read_offset = len(self._ids)
                if self.stop and self._check_stop(old_len):
                    return

    def _check_stop(self, old_len: int) -> bool:
        longest = max(len(s) for s in self.stop)
        start = max(0, old_len - longest + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = self.text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return False
        pos, s = best
        self.text = self.text[: pos + len(s)] if self.include_stop_str_in_output else self.text[:pos]
        self.stopped = True
        return True

    def take_delta(self, final: bool) -> str:
        """Text not yet handed out. Holds back a possible stop-string prefix unless ``final``."""
        end = len(self.text)
        if not final and not self.stopped and self.stop:
            end = max(self._emitted, end - (max(len(s) for s in self.stop) - 1))
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta

"""Drive a grammar processor the way the runner does, with a seeded random "model"."""

from __future__ import annotations

import random

from kvloom.structured.bitmask import allocate_bitmask, unpack_bitmask
from kvloom.structured.logits_processor import LogitsProcessor
from kvloom.structured.vocab import TokenizerVocab


def allowed_tokens(processor: LogitsProcessor, vocab_width: int) -> list[int]:
    """The token ids the processor allows next (fills a poisoned one-row mask first)."""
    bitmask = allocate_bitmask(1, vocab_width)
    bitmask.fill_(0x5A5A5A5A)  # poison: a processor must overwrite the whole row
    processor.fill_bitmask(bitmask, 0)
    ids: list[int] = unpack_bitmask(bitmask, vocab_width)[0].nonzero().flatten().tolist()
    return ids


def random_walk(
    processor: LogitsProcessor, vocab: TokenizerVocab, rng: random.Random, max_steps: int = 300,
    eos_bias: float = 0.5, prefer: frozenset[int] = frozenset(), prefer_bias: float = 0.0,
) -> bytes | None:
    """Sample allowed tokens until the processor terminates; the text's bytes, or None at ``max_steps``.

    Takes an allowed EOS with probability ``eos_bias`` (so that walks end), else an allowed
    token of ``prefer`` with probability ``prefer_bias``, else any allowed token. Checks on
    every step that the mask only allows real (non-special) tokens or EOS, nothing past the
    tokenizer, and that EOS (and only EOS) terminates.
    """
    generated: list[int] = []
    eos_ids = set(vocab.eos_token_ids)
    for _ in range(max_steps):
        allowed = allowed_tokens(processor, vocab.vocab_width)
        assert allowed, "the grammar allows no token at all"
        assert all(t < len(vocab.token_bytes) for t in allowed), "a padded id is allowed"
        assert all(vocab.token_bytes[t] is not None or t in eos_ids for t in allowed), "a special token is allowed"
        eos = [t for t in allowed if t in eos_ids]
        preferred = [t for t in allowed if t in prefer]
        if eos and rng.random() < eos_bias:
            token = rng.choice(eos)
        elif preferred and rng.random() < prefer_bias:
            token = rng.choice(preferred)
        else:
            token = rng.choice(allowed)
        assert processor.accept_token(token), f"an allowed token {token} was rejected"
        if processor.is_terminated():
            assert token in eos_ids, "terminated on a non-EOS token"
            return b"".join(vocab.token_bytes[t] or b"" for t in generated)
        assert token not in eos_ids, "EOS was accepted but the processor did not terminate"
        generated.append(token)
    return None

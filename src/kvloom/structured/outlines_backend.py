"""The outlines backend, through ``outlines_core`` directly: JSON schema, JSON object, regex, choice.

Every spec becomes a regex (see :mod:`kvloom.structured.outlines_worker`), then an
``outlines_core.Index``: a DFA over token ids whose build holds the GIL for up to seconds, so
it runs in the compiler's *process* pool. ``Index`` pickles (compact binary form), so the
worker builds it and sends it back whole; the parent only unpickles it. EBNF grammars are not
supported (a regex DFA cannot express recursion): :data:`EBNF_ERROR`.

Termination: the sequence ends when it samples EOS, which the mask allows only in the DFA's
final (accepting) states. A final state with no other way forward allows EOS alone, so the
model ends there on the next step; this matches the xgrammar backend, which also stops on an
accepted stop token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from kvloom.structured.bitmask import fill_row_from_token_ids, token_bit
from kvloom.structured.logits_processor import LogitsProcessor
from kvloom.structured.outlines_worker import EBNF_ERROR
from kvloom.structured.spec import GrammarSpec
from kvloom.structured.vocab import TokenizerVocab

if TYPE_CHECKING:
    import outlines_core
    import torch

__all__ = ["EBNF_ERROR", "MAX_ROLLBACK_TOKENS", "OutlinesCompiled", "OutlinesProcessor", "make_vocabulary"]

MAX_ROLLBACK_TOKENS = 64
"""How many accepted tokens a processor can roll back (outlines-core keeps this many states)."""


def make_vocabulary(vocab: TokenizerVocab) -> outlines_core.Vocabulary:
    """outlines-core's view of ``vocab``: bytes -> token ids, EOS = the first EOS id.

    ``None`` entries (special tokens, the EOS ids themselves) are left out: outlines-core never
    allows a token it does not know, and refuses the EOS id inside the map.
    """
    import outlines_core

    bytes_to_ids: dict[bytes, list[int]] = {}
    for token_id, data in enumerate(vocab.token_bytes):
        if data is not None:
            bytes_to_ids.setdefault(data, []).append(token_id)
    return outlines_core.Vocabulary(vocab.eos_token_ids[0], bytes_to_ids)


class OutlinesCompiled:
    """One compiled grammar (an ``Index``); hands out a fresh guide per sequence. Immutable, shareable."""

    def __init__(self, spec: GrammarSpec, index: outlines_core.Index, vocab: TokenizerVocab) -> None:
        self.spec = spec
        self.backend = "outlines"
        self.index = index
        self._eos_token_ids = vocab.eos_token_ids

    def new_processor(self) -> LogitsProcessor:
        """A processor at the DFA's initial state (the guide shares the index, it does not copy it)."""
        import outlines_core

        return OutlinesProcessor(outlines_core.Guide(self.index, max_rollback=MAX_ROLLBACK_TOKENS),
                                 self._eos_token_ids)


class OutlinesProcessor(LogitsProcessor):
    """One sequence's position in an outlines-core DFA (a ``Guide``).

    Invariants: the guide's state is the DFA state after the accepted non-EOS tokens;
    ``is_terminated()`` iff the last accepted token is an EOS id (accepted only in a final
    state). Every EOS id is allowed in final states, not only the one outlines-core knows.
    """

    uses_bitmask: ClassVar[bool] = True

    def __init__(self, guide: outlines_core.Guide, eos_token_ids: tuple[int, ...]) -> None:
        self._guide = guide
        self._eos_token_ids = eos_token_ids
        self._terminated = False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Overwrite ``bitmask[row]`` (``int32 [ceil(V / 32)]``, contiguous, on CPU).

        Token ids past the tokenizer and the bits past ``V`` stay 0: outlines-core only sets the
        bits of tokens its vocabulary holds, all below the tokenizer's size.
        """
        import torch

        target = bitmask[row]
        if target.device.type != "cpu" or target.dtype != torch.int32 or not target.is_contiguous():
            raise ValueError("the outlines backend fills contiguous int32 CPU bitmasks only")
        if self._terminated:  # never asked in practice; allow only EOS rather than nothing
            fill_row_from_token_ids(target, list(self._eos_token_ids))
            return
        if hasattr(self._guide, "write_mask_into"):
            # Zeroes all target.numel() words, then sets the allowed bits (every id < tokenizer size).
            self._guide.write_mask_into(target.data_ptr(), target.numel(), target.element_size())
        else:  # older outlines-core
            fill_row_from_token_ids(target, list(self._guide.get_tokens()))
        if self._guide.is_finished():
            for eos in self._eos_token_ids:
                target[eos // 32] |= token_bit(eos)

    def accept_token(self, token_id: int) -> bool:
        if self._terminated:
            return False
        if token_id in self._eos_token_ids:
            # outlines-core has no transition for EOS: it ends the text, allowed in final states.
            self._terminated = bool(self._guide.is_finished())
            return self._terminated
        try:
            self._guide.advance(token_id, return_tokens=False)
        except ValueError:  # no transition: the token is not allowed here; the state is unchanged
            return False
        return True

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (at most :data:`MAX_ROLLBACK_TOKENS`)."""
        if num_tokens and self._terminated:
            self._terminated = False  # the EOS was the last accepted token
            num_tokens -= 1
        if num_tokens:
            self._guide.rollback_state(num_tokens)

    def is_terminated(self) -> bool:
        return self._terminated


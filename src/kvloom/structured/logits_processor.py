"""The public per-sequence logits-processor protocol.

A processor belongs to one sequence (one choice of one request) and lives on the engine
thread, except that ``fill_bitmask`` runs on the runner's mask thread while the step's forward
runs (it needs only the tokens accepted so far). Calls on one processor never overlap: each
step fills, then processes, then accepts. Each step in which its sequence samples a token, the
runner:

1. calls ``fill_bitmask(bitmask, row)`` if ``uses_bitmask``; every bitmask processor of every
   row writes into one ``int32`` ``[B, ceil(V / 32)]`` tensor for the whole batch (bit ``t % 32``
   of word ``t // 32`` set = token ``t`` allowed; rows start all-allowed), and the batch mask
   is applied in one call to the rows that have one;
2. calls ``process_logits(logits_row)`` (``[V]`` float32, modify in place) on every processor;
3. samples, then calls ``accept_token(token_id)`` on every processor of the row. A processor
   that returns ``False`` rejected the token: the sequence ends with ``finish_reason="error"``.
   When ``is_terminated()`` turns true the sequence ends with ``finish_reason="stop"``.

``V`` is the model's logits width, which may exceed the tokenizer's vocabulary (padded
``lm_head``): tokens at or above the tokenizer's size must stay disallowed by grammars.

Processors are never shared between sequences: ``SamplingParams.logits_processors`` holds
zero-argument *factories* (a class with a no-argument constructor is one), called once per
sequence when it first reaches the runner. Prefill chunks that sample nothing never call a
processor; preemption keeps the processor (the tokens it accepted stay accepted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch


class LogitsProcessor:
    """Base class (and protocol) of per-sequence logits processors. Override what you need.

    Invariant: the tokens passed to ``accept_token`` since creation, minus those rolled back,
    are exactly the sequence's generated tokens so far.
    """

    uses_bitmask: ClassVar[bool] = False
    """True if ``fill_bitmask`` should be called (grammars); False skips it."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (``int32 [ceil(V / 32)]``, on CPU).

        Overwrite the whole row (set bits = allowed). Called only when ``uses_bitmask``.
        """
        raise NotImplementedError

    def process_logits(self, logits: torch.Tensor) -> None:
        """Modify one row of logits (``[V]`` float32, on the model's device) in place.

        Disallow a token with ``logits[t] = float("-inf")``. The default does nothing.
        """

    def accept_token(self, token_id: int) -> bool:
        """The sequence sampled ``token_id``; advance. Return False to reject it."""
        return True

    def rollback(self, num_tokens: int) -> None:
        """Forget the last ``num_tokens`` accepted tokens (``0 <= num_tokens <=`` accepted so far)."""

    def is_terminated(self) -> bool:
        """True once the sequence must stop (a grammar that accepted its end)."""
        return False


LogitsProcessorFactory = Callable[[], LogitsProcessor]
"""Makes a fresh processor for one sequence."""

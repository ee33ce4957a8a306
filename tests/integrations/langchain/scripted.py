"""Replies with the model's judgement taken out: a logits processor that writes a given text.

The demo model has random weights: it cannot decide to call ``magic_function`` with 3 or end a
joke's string. ``ScriptedReplies`` stands in for that judgement only: each new sequence (one
per call) writes the next reply's tokens, then the end of turn, while everything else is the
real path (chat template, grammar, engine, parsing, LangChain). A reply the grammar forbids
cannot be forced: the processor keeps the grammar's mask and rejects any other token, so the
sequence ends with ``finish_reason="error"``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from transformers import AutoTokenizer

from kvloom.structured import LogitsProcessor

END_OF_TURN = "<|im_end|>"


def tool_call(name: str, arguments: str) -> str:
    """A call as the Hermes template writes it (what the engine's structural tag allows)."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


class ScriptedReplies:
    """A logits-processor factory: the i-th sequence it serves writes ``replies[i % len]``."""

    def __init__(self, model_dir: Path, *replies: str) -> None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.scripts = [[*tokenizer.encode(r, add_special_tokens=False), end] for r in replies]
        self.num_served = 0
        self._lock = threading.Lock()

    def __call__(self) -> LogitsProcessor:
        with self._lock:
            script = self.scripts[self.num_served % len(self.scripts)]
            self.num_served += 1
        return _Script(script)


class _Script(LogitsProcessor):
    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.step = 0

    def process_logits(self, logits: torch.Tensor) -> None:
        if self.step < len(self.token_ids):
            forced = self.token_ids[self.step]
            keep = logits[forced].clone()  # -inf if the grammar forbids it: then nothing is allowed
            logits.fill_(float("-inf"))
            logits[forced] = keep

    def accept_token(self, token_id: int) -> bool:
        """Anything but the scripted token (the grammar forbade it) ends the sequence in an error."""
        expected = self.token_ids[self.step] if self.step < len(self.token_ids) else token_id
        self.step += 1
        return token_id == expected

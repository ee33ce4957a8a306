"""The standard benchmark workload: random token-id prompts of a seeded length.

The standard CPU workload (docs: benchmarks.md) runs on ``kvloom.models.checkpoints.STANDARD_MODEL``
(a Llama-shaped ~155M checkpoint with random float32 weights): 64 requests, prompt lengths uniform
in [32, 256] from a fixed seed, random token ids, exactly 64 output tokens each, greedy, EOS
ignored. Every size is overridable.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Workload:
    """``num_requests`` prompts of random token ids, each to generate exactly ``output_len`` tokens."""

    num_requests: int = 64
    min_prompt_len: int = 32
    max_prompt_len: int = 256
    output_len: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.output_len < 1:
            raise ValueError("num_requests and output_len must be >= 1")
        if not 1 <= self.min_prompt_len <= self.max_prompt_len:
            raise ValueError(f"need 1 <= min_prompt_len <= max_prompt_len, got {self.min_prompt_len}, {self.max_prompt_len}")

    def prompts(self, vocab_size: int) -> list[list[int]]:
        """Deterministic prompts: lengths uniform in [min, max], ids uniform in [0, vocab_size).

        ``random.Random`` (not torch/numpy) so the same seed gives the same prompts whatever
        library versions are installed.
        """
        rng = random.Random(self.seed)
        lengths = [rng.randint(self.min_prompt_len, self.max_prompt_len) for _ in range(self.num_requests)]
        return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


def read_vocab_size(model_dir: Path) -> int:
    """``vocab_size`` from the checkpoint's config.json (top level or ``text_config``)."""
    config = json.loads((model_dir / "config.json").read_text())
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not isinstance(vocab, int):
        raise ValueError(f"{model_dir}/config.json has no integer vocab_size")
    return vocab

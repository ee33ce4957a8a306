"""transformers as the reference: greedy generation and raw logits, one prompt at a time."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch


@dataclass(frozen=True)
class HFResult:
    token_ids: list[int]
    logprobs: torch.Tensor
    """``[num_new_tokens, vocab]``: log_softmax of the raw logits at each generated position."""


@cache
def _model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int) -> HFResult:
    """Greedy, EOS ignored, no padding (batch of one), so the reference is exact."""
    model = _model(model_dir)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, len(prompt) :].tolist()
    logits = torch.stack([step[0] for step in out.logits]).float()
    return HFResult(new, torch.log_softmax(logits, dim=-1))

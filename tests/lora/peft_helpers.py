"""Build real PEFT LoRA adapters for the tiny checkpoints, and the transformers + PEFT reference.

PEFT initialises ``lora_B`` to zero, which would make any parity test vacuous; the helper
overwrites A and B with seeded random values scaled so the adapter visibly changes the logits
(A ~ N(0, 1/sqrt(in)), B ~ N(0, 1/sqrt(r)): with ``alpha == r`` the delta is as large as the base
projection's output).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_hf(base_dir: Path) -> Any:
    """The transformers model for ``base_dir``, float32, eager attention, eval mode."""
    import transformers

    auto: Any = transformers.AutoModelForCausalLM
    return auto.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()


def make_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int,
    alpha: float,
    target_modules: list[str] | str,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    seed: int = 0,
    **config: Any,
) -> Path:
    """Save a random PEFT LoRA adapter for the checkpoint at ``base_dir`` into ``out_dir``; returns it.

    ``config`` passes further ``LoraConfig`` fields (e.g. ``layers_to_transform``). Deterministic
    for a given ``seed``; the caller's global RNG is left untouched.
    """
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=target_modules, use_rslora=use_rslora,
        rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, lora_dropout=0.0, **config,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(load_hf(base_dir), lora_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:  # N(0, 1/sqrt(in)) for A, N(0, 1/sqrt(r)) for B
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def load_hf_with_adapter(base_dir: Path, adapter_dir: Path) -> Any:
    """transformers + PEFT: the base model with the adapter at ``adapter_dir`` applied (eval mode)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_hf(base_dir), adapter_dir).eval()


@torch.no_grad()
def hf_logits(model: Any, tokens: list[int]) -> torch.Tensor:
    """Logits ``[len(tokens), vocab]`` float32 for one unpadded sequence."""
    logits: torch.Tensor = model(torch.tensor([tokens])).logits[0].float()
    return logits

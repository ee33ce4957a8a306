"""Random LoRA adapters written in PEFT's on-disk format (benchmarks and the demo: no download).

The files are what ``peft``'s ``save_pretrained`` writes for a LoRA on a Llama-family model:
``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight``
(A ``[r, in]``, B ``[out, r]``). Unlike PEFT's init, B is random too, so the adapter changes
the model's outputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from kvloom.lora.adapter import projection_shape
from kvloom.models.config import ModelConfig

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def write_random_adapter(
    out_dir: str | Path, config: ModelConfig, *, r: int = 16, alpha: float = 32.0,
    target_modules: Sequence[str] = ATTN_MODULES + MLP_MODULES, seed: int = 0, std: float = 1.0,
) -> Path:
    """Write a random rank-``r`` LoRA for ``config``; A ~ N(0, std/sqrt(in)), B ~ N(0, std/sqrt(r))."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config.num_layers):
        for module in target_modules:
            fan_in, fan_out = projection_shape(config, module)
            part = "self_attn" if module in ATTN_MODULES else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) * (std / math.sqrt(fan_in))
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * (std / math.sqrt(r))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": sorted(target_modules), "bias": "none", "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0,
        "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out

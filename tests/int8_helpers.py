"""References for int8 engines: a float checkpoint holding the int8 round trip of another's weights, and the
int8 kernel's torch reference in the kernel's signature."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvloom.kernels import int8_linear_cpu


def dequantized_checkpoint(src: Path, dst: Path) -> Path:
    """``src`` with every linear weight (and an untied LM head) replaced by its int8 round trip."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    if "lm_head.weight" not in tensors:  # tied: the head is quantized, the embedding stays float
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        config = json.loads((dst / "config.json").read_text())
        config["tie_word_embeddings"] = False
        (dst / "config.json").write_text(json.dumps(config))
    for name, t in list(tensors.items()):
        if t.dim() == 2 and name != "model.embed_tokens.weight":
            q, scale = int8_linear_cpu.quantize_per_channel(t)
            tensors[name] = int8_linear_cpu.dequantize_reference(q, scale).contiguous()
    save_file(tensors, dst / "model.safetensors")
    return dst


def reference_bound_linear(packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                           k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``int8_linear_cpu.bound_linear`` on the kernel's torch reference (patch it in to run an engine on the
    reference): the unpacked weights, ``int8_linear_reference``."""
    q = int8_linear_cpu.unpack(packed, scale.shape[0], k)
    return lambda x: int8_linear_cpu.int8_linear_reference(x, q, scale, bias)

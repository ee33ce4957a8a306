"""LoRA fixtures: tiny base checkpoints and random PEFT adapters for them, each built once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.lora.peft_helpers import make_peft_adapter

# arch -> checkpoint_factory kwargs. qwen2 has qkv biases and odd sizes (GQA 3:1); qwen3 has head_dim != hidden/heads.
BASES: dict[str, dict[str, Any]] = {
    "llama": dict(arch="llama"),
    "qwen2": dict(arch="qwen2", hidden_size=48, num_heads=6, num_kv_heads=2, intermediate_size=96),
    "qwen3": dict(arch="qwen3", num_heads=6, num_kv_heads=2, head_dim=8, intermediate_size=96),
}

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def base_dir(checkpoint_factory: Callable[..., Path]) -> Callable[[str], Path]:
    """``base_dir(arch) -> Path`` of the BASES checkpoint for ``arch``."""
    return lambda arch: checkpoint_factory(**BASES[arch])


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, base_dir: Callable[[str], Path]) -> Callable[..., Path]:
    """``adapter_dir(arch, **make_peft_adapter kwargs) -> Path``; each distinct spec is built once."""
    built: dict[str, Path] = {}

    def factory(arch: str, **spec: Any) -> Path:
        key = repr((arch, sorted(spec.items())))
        if key not in built:
            built[key] = make_peft_adapter(base_dir(arch), tmp_path_factory.mktemp(f"lora_{arch}"), **spec)
        return built[key]

    return factory

"""Linear weights are stored input-major on CPU in float32 (a faster sgemm operand there), keeping
their HF shape and values; other dtypes keep the row-major layout."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kvloom.layers.attention import AttentionBackend
from kvloom.layers.linear import Linear
from kvloom.layers.weight_layout import prefers_input_major
from kvloom.models.loader import load_model


def _linears(model: torch.nn.Module) -> dict[str, Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def test_float32_cpu_linears_are_input_major_with_the_checkpoint_values(
        checkpoints: dict[str, Path], attn_backend: AttentionBackend) -> None:
    model, _ = load_model(checkpoints["llama"], attn_backend=attn_backend, dtype="float32")
    tensors = load_file(checkpoints["llama"] / "model.safetensors")
    linears = _linears(model)
    assert linears, "the model has Linear layers"
    for name, layer in linears.items():
        weight = layer.weight
        assert weight.shape == (layer.out_features, layer.in_features)
        assert weight.t().is_contiguous() and not weight.is_contiguous(), f"{name} is not input-major"
    # A non-fused layer holds exactly the checkpoint's tensor, and computes what the row-major one does.
    down = linears["model.layers.0.mlp.down_proj"]
    expected = tensors["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(down.weight, expected)
    x = torch.randn(32, down.in_features)
    torch.testing.assert_close(down(x), F.linear(x, expected.contiguous()), rtol=1e-6, atol=1e-6)


def test_other_dtypes_and_devices_keep_the_row_major_layout(
        checkpoints: dict[str, Path], attn_backend: AttentionBackend) -> None:
    assert prefers_input_major(torch.device("cpu"), torch.float32)
    assert not prefers_input_major(torch.device("cpu"), torch.bfloat16)
    assert not prefers_input_major(torch.device("cuda"), torch.float32)
    model, _ = load_model(checkpoints["llama"], attn_backend=attn_backend, dtype="bfloat16")
    assert all(layer.weight.is_contiguous() for layer in _linears(model).values())

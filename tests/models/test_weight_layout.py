"""Linear weights on CPU: oneDNN-packed in float32 and bf16 where oneDNN packs (the default), input-major
float32 for MKL otherwise (``cpu_gemm="torch"`` or no packing), the HF layout for other dtypes and
devices. Every layout keeps the HF shape and the checkpoint's values and computes the same
products; the choice is decided with the CPU's capability faked both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kvloom.errors import ConfigError
from kvloom.layers.attention import AttentionBackend
from kvloom.layers.linear import Linear
from kvloom.layers.weight_layout import apply_layout, choose_layout, onednn_packs
from kvloom.models.loader import load_model

CPU = torch.device("cpu")


def _linears(model: torch.nn.Module) -> dict[str, Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def _dense(layer: Linear) -> torch.Tensor:
    return layer.weight.to_dense() if layer.onednn_packed else layer.weight


def test_the_choice_by_setting_dtype_device_and_capability() -> None:
    fp32, bf16 = torch.float32, torch.bfloat16
    assert choose_layout("auto", CPU, fp32, onednn=True).name == "onednn-packed"
    assert choose_layout("auto", CPU, fp32, onednn=False).name == "input-major"
    assert choose_layout("torch", CPU, fp32, onednn=True).name == "input-major"
    # bf16 is packed where oneDNN packs it (AMX / AVX512-BF16), torch's dispatch elsewhere; fp16 never by default.
    assert choose_layout("auto", CPU, bf16, onednn=True).name == "onednn-packed"
    assert choose_layout("auto", CPU, bf16, onednn=False).name == "row-major"
    assert choose_layout("auto", CPU, torch.float16, onednn=True).name == "row-major"
    assert choose_layout("torch", CPU, bf16, onednn=True).name == "row-major"
    assert choose_layout("onednn", CPU, bf16, onednn=True).name == "onednn-packed"
    with pytest.raises(ConfigError, match=r"cpu_gemm='onednn'.*cannot pack bfloat16"):
        choose_layout("onednn", CPU, bf16, onednn=False)
    assert choose_layout("auto", torch.device("cuda"), fp32).name == "row-major"
    with pytest.raises(ConfigError, match="cpu_gemm='onednn' is for CPU"):
        choose_layout("onednn", torch.device("cuda"), fp32)


def test_the_probe_agrees_with_what_torch_does() -> None:
    packs = onednn_packs(torch.float32)
    assert packs == torch.backends.mkldnn.is_available()  # x86 wheels of torch ship oneDNN
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return
    assert onednn_packs(torch.bfloat16)


@pytest.mark.parametrize("cpu_gemm", ["auto", "torch"])
def test_float32_linears_keep_the_checkpoint_values_and_compute_the_same_products(
        cpu_gemm: str, checkpoints: dict[str, Path], attn_backend: AttentionBackend) -> None:
    model, _ = load_model(checkpoints["llama"], attn_backend=attn_backend, dtype="float32",
                          cpu_gemm=cpu_gemm)  # type: ignore[arg-type]
    assert model.weight_layout is not None
    expected_layout = "onednn-packed" if cpu_gemm == "auto" and onednn_packs(torch.float32) else "input-major"
    assert model.weight_layout.name == expected_layout
    tensors = load_file(checkpoints["llama"] / "model.safetensors")
    linears = _linears(model)
    assert linears, "the model has Linear layers"
    for name, layer in linears.items():
        assert layer.weight.shape == (layer.out_features, layer.in_features), name
        assert layer.onednn_packed == (expected_layout == "onednn-packed"), name
        if expected_layout == "input-major":
            assert layer.weight.t().is_contiguous() and not layer.weight.is_contiguous(), name
    # A non-fused layer holds exactly the checkpoint's tensor and computes what F.linear does with it.
    down = linears["model.layers.0.mlp.down_proj"]
    expected = tensors["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(_dense(down), expected)
    for rows in (1, 3, 32):
        x = torch.randn(rows, down.in_features)
        torch.testing.assert_close(down(x), F.linear(x, expected.contiguous()), rtol=1e-5, atol=1e-5)


def test_a_packed_weight_cannot_be_used_as_a_dense_matrix() -> None:
    if not onednn_packs(torch.float32):
        pytest.skip("this torch build has no oneDNN")
    layer = Linear(8, 4, bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    dense = layer.weight.detach().clone()
    apply_layout(layer, choose_layout("onednn", CPU, torch.float32))
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), F.linear(x, dense, layer.bias), rtol=1e-5, atol=1e-5)
    assert "weight" not in dict(layer.named_parameters())  # a buffer now: loaders cannot write into it
    with pytest.raises((RuntimeError, NotImplementedError)):
        F.linear(x, layer.weight)


def test_bf16_is_packed_where_onednn_packs_it_and_computes_the_same_products(
        checkpoints: dict[str, Path], attn_backend: AttentionBackend) -> None:
    model, _ = load_model(checkpoints["llama"], attn_backend=attn_backend, dtype="bfloat16")
    packs = onednn_packs(torch.bfloat16)
    assert model.weight_layout is not None
    assert model.weight_layout.name == ("onednn-packed" if packs else "row-major")
    assert all(layer.onednn_packed == packs for layer in _linears(model).values())
    down = _linears(model)["model.layers.0.mlp.down_proj"]
    expected = load_file(checkpoints["llama"] / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(_dense(down).float(), expected.to(torch.bfloat16).float())
    for rows in (1, 3, 32):
        x = torch.randn(rows, down.in_features).to(torch.bfloat16)
        # One bf16 rounding of the output apart at most: both accumulate in float32, in other orders.
        torch.testing.assert_close(down(x), F.linear(x, expected.to(torch.bfloat16)), rtol=1.6e-2, atol=1e-2)


def test_float16_and_other_devices_keep_the_row_major_layout(
        checkpoints: dict[str, Path], attn_backend: AttentionBackend) -> None:
    model, _ = load_model(checkpoints["llama"], attn_backend=attn_backend, dtype="float16")
    assert model.weight_layout is not None and model.weight_layout.name == "row-major"
    assert all(layer.weight.is_contiguous() and not layer.onednn_packed for layer in _linears(model).values())


def test_packed_models_name_the_same_weights_and_refuse_a_second_load(
        checkpoints: dict[str, Path], attn_backend: AttentionBackend) -> None:
    from kvloom.errors import CheckpointError

    packed, _ = load_model(checkpoints["qwen2"], attn_backend=attn_backend, dtype="float32", cpu_gemm="auto")
    dense, _ = load_model(checkpoints["qwen2"], attn_backend=attn_backend, dtype="float32", cpu_gemm="torch")
    assert packed.expected_weight_names() == dense.expected_weight_names()
    if packed.weight_layout is not None and packed.weight_layout.name == "onednn-packed":
        with pytest.raises(CheckpointError, match="packed for oneDNN"):
            packed.load_weights(load_file(checkpoints["qwen2"] / "model.safetensors").items())

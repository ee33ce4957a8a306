"""``quantization="int8"``: every linear layer (the LM head included, untied from a tied embedding, which
stays float) holds int8 weights per output channel. A quantized layer is within the rounding bound of the
float layer it replaced and equal (to float32 summation order) to its reference on both kernels (the int8
kernel, whose activations are quantized per block of 32; dequantized blocks through the GEMM); LoRA stays
float on top; an engine's greedy tokens equal those of the engine on the kernel's torch reference; the
setting is refused with a message naming it where it cannot run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydantic
import pytest
import torch
import torch.nn.functional as F

from kvloom import LLM, SamplingParams
from kvloom.config import EngineConfig
from kvloom.errors import ConfigError
from kvloom.kernels import int8_linear_cpu
from kvloom.layers import int8_weights
from kvloom.layers.linear import Linear, MergedLinear
from kvloom.layers.weight_layout import choose_layout
from tests.int8_helpers import dequantized_checkpoint, reference_bound_linear

CPU = torch.device("cpu")
EPS32 = 2.0**-24


def _layer(out: int, k: int, bias: bool, seed: int) -> tuple[Linear, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    layer = MergedLinear(k, [out // 2, out - out // 2], bias, torch.float32)
    w = torch.randn(out, k, generator=g) / k**0.5
    b = torch.randn(out, generator=g) if bias else None
    layer.weight.data.copy_(w)
    if b is not None:
        assert layer.bias is not None
        layer.bias.data.copy_(b)
    return layer, w, b


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_layer_is_within_the_rounding_bound_of_the_float_layer(
    rows: int, bias: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """float32: the int8 kernel at every row count; bf16: the kernel up to 8 rows, dequantized blocks through
    the bf16 GEMM above (16-channel blocks here, 7 of them)."""
    monkeypatch.setattr(int8_weights, "CHUNK_BYTES", 16 * 96 * dtype.itemsize)
    layer, w, b = _layer(100, 96, bias, seed=rows)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(100 + rows))
    layer.to(dtype)
    layer.quantize_int8(int8_linear_cpu)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (25, 3, 4, 32) and layer.bias is None
    assert layer.compute_dtype == dtype and layer.int8 is not None
    out = layer(x.to(dtype)).double()
    assert layer(x.to(dtype)).dtype == dtype
    q = int8_linear_cpu.unpack(layer.int8.packed, 100, 96)
    kernel = layer.int8.gemv_rows is None or rows <= layer.int8.gemv_rows
    assert kernel == (dtype == torch.float32 or rows <= int8_weights.GEMV_ROWS_BF16)
    # The layer quantized its weights as they were in ``dtype``, and reads its input in ``dtype``.
    xd, wd = x.to(dtype).float(), w.to(dtype).float()
    b32 = None if b is None else b.to(dtype).float()
    # Each weight is off by at most scale[n] / 2, and on the kernel each activation by half its block's step;
    # bf16 outputs are rounded to bf16 (once on the kernel; on the GEMM the product and the bias sum each).
    weight_only = xd.abs().sum(1, keepdim=True).double() * layer.int8.scale.double()[None, :] / 2
    rounding = int8_linear_cpu.rounding_bound(xd, q, layer.int8.scale) if kernel else weight_only
    summation = 4 * 96 * EPS32 * (xd.abs() @ wd.abs().T + 1).double()
    bias_abs = 0 if b32 is None else b32.abs().double()
    out_rounding = 0 if dtype == torch.float32 else (out.abs() + bias_abs) * 2**-7
    assert bool(((out - F.linear(xd, wd, b32).double()).abs() <= rounding + summation + out_rounding).all())
    # ... and equals its reference: the int8 arithmetic on the kernel, the float product with the
    # dequantized weights on the GEMM, up to float32 summation order (and the output's bf16 rounding).
    if kernel:
        expected = int8_linear_cpu.int8_linear_reference(xd, q, layer.int8.scale, b32).double()
    else:
        expected = F.linear(xd, layer.int8.dequantize().float(), b32).double()
    assert bool(((out - expected).abs() <= summation + out_rounding).all())


def test_lora_deltas_add_in_float_on_top_of_int8_weights() -> None:
    layer, _, _ = _layer(48, 32, False, seed=1)
    layer.quantize_int8(int8_linear_cpu)

    class Plus:
        def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            assert out.dtype == torch.float32
            return out + 1.0

    x = torch.randn(2, 32)
    plain = layer(x)
    layer.delta = Plus()
    torch.testing.assert_close(layer(x), plain + 1.0)


def test_the_setting_is_refused_where_it_cannot_run() -> None:
    assert choose_layout("auto", CPU, torch.float32, onednn=True, quantization="int8").name == "int8"
    assert choose_layout("auto", CPU, torch.bfloat16, onednn=False, quantization="int8").name == "int8"
    with pytest.raises(ConfigError, match="quantization='int8' runs on CPU; the model is on cuda"):
        choose_layout("auto", torch.device("cuda"), torch.bfloat16, quantization="int8")
    with pytest.raises(ConfigError, match="quantization='int8' computes in float32 or bfloat16, not float16"):
        choose_layout("auto", CPU, torch.float16, quantization="int8")
    with pytest.raises(pydantic.ValidationError, match="quantization"):
        EngineConfig(model=Path("."), quantization="fp4")  # type: ignore[arg-type]


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_tokens_equal_the_engine_on_the_kernels_torch_reference(
    checkpoint_factory: Callable[..., Path], tmp_path: Path, tied: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine's int8 steps (prefill of 9 to 63 rows and decode, every linear, the LM head included)
    give the tokens of the same engine with each kernel call replaced by its torch reference on the
    unpacked weights; and the first token, from the prefill, is that of a float32 engine on a checkpoint
    holding the dequantized weights when the prefill takes the weight-only GEMM (the bf16 path's rule)."""
    model = checkpoint_factory(arch="qwen2", hidden_size=64, tie_word_embeddings=tied)  # qkv biases too
    prompts = [[5, 9, 33, 2, 17, 8, 40, 41, 3] * k for k in (1, 3, 7)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    got = LLM(model, dtype="float32", quantization="int8").generate(prompts, params)

    bound: list[int] = []

    def on_the_reference(packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                         k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        bound.append(k)
        return reference_bound_linear(packed, scale, bias, k)

    with monkeypatch.context() as patch:
        patch.setattr(int8_linear_cpu, "bound_linear", on_the_reference)
        expected = LLM(model, dtype="float32", quantization="int8").generate(prompts, params)
    assert len(bound) >= 7  # every linear of the two layers and the LM head ran on the reference
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]

    reference_dir = dequantized_checkpoint(model, tmp_path / "dequantized")
    monkeypatch.setattr(int8_weights, "gemv_rows_for", lambda dtype: 8)
    weight_only = LLM(model, dtype="float32", quantization="int8").generate(prompts, params)
    dequantized = LLM(reference_dir, dtype="float32").generate(prompts, params)
    assert [c.token_ids[0] for c in weight_only] == [c.token_ids[0] for c in dequantized]


def test_an_int8_engine_says_what_its_weights_are_and_why(llama_dir: Path) -> None:
    llm = LLM(llama_dir, dtype="float32", quantization="int8")
    name, reason = llm.weight_layout
    assert name == "int8" and "int8 weights per output channel" in reason
    assert LLM(llama_dir, dtype="float32").weight_layout[0] != "int8"


def test_without_a_c_compiler_int8_is_refused_at_construction(
    llama_dir: Path, fresh_kernel_cache: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(ConfigError, match="quantization='int8' needs its C kernel, which could not be built here"):
        LLM(llama_dir, dtype="float32", quantization="int8", attention_backend="torch")

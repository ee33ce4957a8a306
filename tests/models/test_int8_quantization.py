"""``quantization="int8"``: every linear layer (the LM head included, untied from a tied embedding, which
stays float) holds int8 weights per output channel. A quantized layer is within the rounding bound of the
float layer it replaced and equal (to float32 summation order) to the float layer with the dequantized
weights, on both kernels (few rows, many rows in blocks); LoRA stays float on top; an engine's greedy
tokens equal those of a float32 engine on a checkpoint holding the dequantized weights; the setting is
refused with a message naming it where it cannot run."""

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
from tests.int8_helpers import dequantized_checkpoint

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
def test_a_quantized_layer_is_within_the_rounding_bound_of_the_float_layer(
    rows: int, bias: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(int8_weights, "CHUNK_BYTES", 16 * 96 * 4)  # many rows: 16-channel blocks, 7 of them
    layer, w, b = _layer(100, 96, bias, seed=rows)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(100 + rows))
    float_out = F.linear(x, w, b)
    layer.quantize_int8(int8_linear_cpu)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (100, 96) and layer.bias is None
    assert layer.compute_dtype == torch.float32 and layer.int8 is not None
    out = layer(x)
    # Each weight is off by at most scale[n] / 2, so each output by at most sum_k |x_k| * scale[n] / 2.
    rounding = x.abs().sum(1, keepdim=True) * layer.int8.scale[None, :] / 2
    summation = 4 * 96 * EPS32 * (x.abs() @ w.abs().T + 1)
    assert bool(((out - float_out).abs() <= rounding + summation).all())
    # ... and equals the float product with the dequantized weights up to float32 summation order.
    dequantized = F.linear(x, layer.int8.dequantize(), b)
    assert bool(((out - dequantized).abs() <= summation).all())


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
def test_greedy_tokens_equal_a_float_engine_on_the_dequantized_weights(
    checkpoint_factory: Callable[..., Path], tmp_path: Path, tied: bool,
) -> None:
    model = checkpoint_factory(arch="qwen2", hidden_size=64, tie_word_embeddings=tied)  # qkv biases too
    reference = dequantized_checkpoint(model, tmp_path / "dequantized")
    prompts = [[5, 9, 33, 2, 17, 8, 40, 41, 3] * k for k in (1, 3, 7)]  # prefill of 9 to 63 rows: both kernels
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    got = LLM(model, dtype="float32", quantization="int8").generate(prompts, params)
    expected = LLM(reference, dtype="float32").generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]


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

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
from kvloom.layers import int8_onednn, int8_weights
from kvloom.layers.int8_weights import Int8Plan
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


PLANS = {
    "float32, oneDNN above 16 rows": (torch.float32, Int8Plan(16, "onednn")),
    "float32, the kernel at every row count": (torch.float32, Int8Plan(None, "dequantize")),
    "bf16, dequantized above 8 rows": (torch.bfloat16, Int8Plan(8, "dequantize")),
}


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_a_quantized_layer_is_within_the_rounding_bound_of_the_float_layer(
    rows: int, bias: bool, plan_name: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each kernel a plan gives these rows (the C kernel; oneDNN's int8 GEMM; dequantized blocks through the
    GEMM, 16-channel blocks here, 7 of them) is within its roundings' bound of the float product and equals
    its own reference up to float32 summation order."""
    dtype, plan = PLANS[plan_name]
    monkeypatch.setattr(int8_weights, "CHUNK_BYTES", 16 * 96 * dtype.itemsize)
    layer, w, b = _layer(100, 96, bias, seed=rows)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(100 + rows))
    layer.to(dtype)
    layer.quantize_int8(int8_linear_cpu, plan)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (25, 3, 4, 32) and layer.bias is None
    assert layer.compute_dtype == dtype and layer.int8 is not None and layer.int8.plan == plan
    out = layer(x.to(dtype)).double()
    assert layer(x.to(dtype)).dtype == dtype
    q, scale = int8_linear_cpu.unpack(layer.int8.packed, 100, 96), layer.int8.scale
    path = "kernel" if plan.gemv_rows is None or rows <= plan.gemv_rows else plan.many_rows
    # The layer quantized its weights as they were in ``dtype``, and reads its input in ``dtype``.
    xd, wd = x.to(dtype).float(), w.to(dtype).float()
    b32 = None if b is None else b.to(dtype).float()
    # Each weight is off by at most scale[n] / 2, and each activation quantized (the kernel, oneDNN) by half
    # its step; bf16 outputs are rounded to bf16 (once on the kernel; on the GEMM the product and the bias sum).
    rounding = {
        "kernel": lambda: int8_linear_cpu.rounding_bound(xd, q, scale),
        "onednn": lambda: int8_onednn.rounding_bound(xd, q, scale),
        "dequantize": lambda: xd.abs().sum(1, keepdim=True).double() * scale.double()[None, :] / 2,
    }[path]()
    summation = 4 * 96 * EPS32 * (xd.abs() @ wd.abs().T + 1).double()
    bias_abs = 0 if b32 is None else b32.abs().double()
    out_rounding = 0 if dtype == torch.float32 else (out.abs() + bias_abs) * 2**-7
    assert bool(((out - F.linear(xd, wd, b32).double()).abs() <= rounding + summation + out_rounding).all())
    expected = {
        "kernel": lambda: int8_linear_cpu.int8_linear_reference(xd, q, scale, b32),
        "onednn": lambda: int8_onednn.reference(xd, q, scale, b32),
        "dequantize": lambda: F.linear(xd, layer.int8.dequantize().float(), b32),
    }[path]().double()
    assert bool(((out - expected).abs() <= summation + out_rounding).all())


def test_the_plan_follows_the_dtype_and_what_torch_can_run() -> None:
    assert int8_weights.plan_for(torch.float32, onednn_int8=True) == Int8Plan(16, "onednn")
    assert int8_weights.plan_for(torch.float32, onednn_int8=False) == Int8Plan(None, "dequantize")
    assert int8_weights.plan_for(torch.bfloat16, onednn_int8=True) == Int8Plan(8, "dequantize")
    assert "oneDNN's int8 GEMM" in Int8Plan(16, "onednn").describe()
    assert "at every row count" in Int8Plan(None, "dequantize").describe()


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
    give the tokens of the same engine with each kernel call (the C kernel, oneDNN's int8 GEMM) replaced
    by its torch reference on the unpacked weights; and the first token, from the prefill, is that of a
    float32 engine on a checkpoint holding the dequantized weights when the prefill takes the weight-only
    GEMM (the bf16 plan's rule)."""
    model = checkpoint_factory(arch="qwen2", hidden_size=64, tie_word_embeddings=tied)  # qkv biases too
    prompts = [[5, 9, 33, 2, 17, 8, 40, 41, 3] * k for k in (1, 3, 7)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    got = LLM(model, dtype="float32", quantization="int8").generate(prompts, params)

    bound: list[int] = []

    def on_the_reference(packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                         k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        bound.append(k)
        return reference_bound_linear(packed, scale, bias, k)

    many: list[int] = []
    dense: dict[int, torch.Tensor] = {}
    prepack = int8_onednn.prepack

    def recording_prepack(q: torch.Tensor) -> int8_onednn.OnednnWeights:
        weights = prepack(q)
        dense[id(weights)] = q
        return weights

    def many_rows_on_the_reference(x: torch.Tensor, weights: int8_onednn.OnednnWeights, scale: torch.Tensor,
                                   bias: torch.Tensor | None) -> torch.Tensor:
        many.append(x.shape[0])
        return int8_onednn.reference(x, dense[id(weights)], scale, bias)

    with monkeypatch.context() as patch:
        patch.setattr(int8_linear_cpu, "bound_linear", on_the_reference)
        patch.setattr(int8_onednn, "prepack", recording_prepack)
        patch.setattr(int8_onednn, "linear", many_rows_on_the_reference)
        expected = LLM(model, dtype="float32", quantization="int8").generate(prompts, params)
    assert max(many) > 16  # prefills of more rows ran on oneDNN's reference
    assert len(bound) >= 7  # every linear of the two layers and the LM head ran on the reference
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]

    reference_dir = dequantized_checkpoint(model, tmp_path / "dequantized")
    monkeypatch.setattr(int8_weights, "plan_for", lambda dtype: Int8Plan(8, "dequantize"))
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

"""How ``Linear`` weights are laid out in memory for the GEMM library that multiplies them (CPU).

A ``Linear`` keeps the HF shape ``weight [out_features, in_features]``; the layout is chosen once,
after loading, by :func:`choose_layout` (``cpu_gemm`` setting, device, dtype, what the CPU and
torch can do) and applied by :func:`apply_layout`:

- ``onednn-packed``: the weight is reordered once into oneDNN's blocked layout and each forward
  calls oneDNN's linear on it (``torch.ops.mkldnn._linear_pointwise``, what torch's own CPU
  compiler emits for frozen linears). MKL's sgemm, which ``F.linear`` uses in float32, packs the
  weight operand again on every call; at decode's few rows that packing, not the math, is the
  cost. Measured on a 2-core AMD EPYC (AVX2), torch 2.13, float32, ms per call, MKL
  (input-major) -> oneDNN packed: ``[M,1024]x[1024,5632]`` M=1 1.17 -> 1.12, M=2 2.30 -> 1.24,
  M=8 4.86 -> 2.10, M=16 5.82 -> 3.10, M=64 13.2 -> 9.9; ``[M,1024]x[1024,32000]`` (an LM head)
  M=8 37.9 -> 10.5; at M=512-2048 1.0-1.15x faster. Sums run in another order than MKL's:
  results differ in the last bits (relative ~1e-6).
- ``input-major``: MKL's sgemm with the weight stored as the transpose of a contiguous
  ``[in_features, out_features]`` (a plain row-major operand for ``x @ weight.T``): 1.1-1.3x
  faster than the HF layout at decode row counts, bitwise equal results for M >= 16. The
  float32 fallback where oneDNN cannot pack.
  bf16 is packed too where oneDNN packs it (CPUs with AMX-BF16 or AVX512-BF16; torch refuses
  elsewhere). ``F.linear`` in bf16 already runs oneDNN, but reorders the weight on every call.
  Measured on a 2-core Intel Xeon with AMX, torch 2.13, GFLOP/s, ``F.linear`` -> packed:
  ``[M,1024]x[1024,5632]`` M=1 28 -> 42, M=16 431 -> 643, M=64 1065 -> 1831, M=256 2171 -> 2993,
  M=2048 2397 -> 2599; the LM head ``[M,1024]x[1024,32000]`` M=64 1019 -> 1881.
- ``row-major``: the HF layout, untouched: GPUs, fp16 on CPU, and bf16 where oneDNN cannot pack it,
  unless ``cpu_gemm="onednn"``.
- ``int8`` (``quantization="int8"``, CPU): every ``Linear`` (the LM head included, untied from the
  embedding; the embedding itself stays float: a lookup reads one row a token) holds int8 weights per
  output channel, symmetric (``layers.int8_weights``, which also says which kernel each row count takes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.errors import ConfigError
from kvloom.layers.linear import Linear

CpuGemm = Literal["auto", "onednn", "torch"]
LayoutName = Literal["onednn-packed", "input-major", "row-major", "int8"]
Quantization = Literal["int8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)


@dataclass(frozen=True, slots=True)
class WeightLayout:
    """The layout every ``Linear`` weight gets, and why (logged)."""

    name: LayoutName
    reason: str


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU pack ``dtype`` weights for oneDNN and multiply with them
    correctly: a small packed product is computed and compared with ``F.linear``'s. bf16 and fp16
    packing need CPU features AVX2 machines lack; torch then refuses, and this says False."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
            and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")):
        return False
    weight = (torch.arange(48, dtype=torch.float32).reshape(6, 8) / 48).to(dtype)
    x = (torch.arange(24, dtype=torch.float32).reshape(3, 8) / 24 - 0.5).to(dtype)
    try:
        with torch.no_grad():
            out = ops._linear_pointwise(x, ops._reorder_linear_weight(weight, None), None, "none", [], "")
    except RuntimeError:
        return False
    return bool(torch.allclose(out.float(), F.linear(x, weight).float(), rtol=1e-2, atol=1e-2))


def choose_layout(requested: CpuGemm, device: torch.device, dtype: torch.dtype,
                  onednn: bool | None = None, quantization: Quantization | None = None) -> WeightLayout:
    """The layout for ``Linear`` weights on ``device`` in ``dtype``.

    ``quantization="int8"`` gives the ``int8`` layout on CPU in float32 or bf16, and a ``ConfigError``
    naming the field anywhere else (GPUs: int8 weight-only is slower than bf16 on H100-class GPUs, and
    nothing here has measured otherwise).

    ``requested`` is the ``cpu_gemm`` setting: ``auto`` (oneDNN-packed in float32 and bf16 where it
    packs, else input-major in float32, else row-major), ``onednn`` (packed, or a ``ConfigError`` naming
    the setting where it cannot pack), ``torch`` (``F.linear``: input-major in float32). ``onednn``
    is whether oneDNN packs ``dtype`` here (default: :func:`onednn_packs`, asked only on CPU), so
    tests decide both branches on any machine.
    """
    if quantization is not None:
        return _int8_layout(quantization, device, dtype)
    if device.type != "cpu":
        if requested == "onednn":
            raise ConfigError(f"cpu_gemm='onednn' is for CPU weights; the model is on {device.type}")
        return WeightLayout("row-major", f"{device.type}: the checkpoint's layout")
    name = str(dtype).removeprefix("torch.")
    if requested in ("auto", "onednn"):
        packs = onednn_packs(dtype) if onednn is None else onednn
        if requested == "onednn":
            if not packs:
                raise ConfigError(f"cpu_gemm='onednn': this CPU and torch build cannot pack {name} weights for oneDNN")
            return WeightLayout("onednn-packed", "cpu_gemm='onednn' was asked for")
        if packs and dtype in (torch.float32, torch.bfloat16):
            return WeightLayout("onednn-packed", f"auto on CPU in {name}: oneDNN with prepacked weights")
    if dtype == torch.float32:
        why = "cpu_gemm='torch'" if requested == "torch" else "oneDNN cannot pack weights here"
        return WeightLayout("input-major", f"{why}: MKL sgemm on input-major weights")
    return WeightLayout("row-major", f"{name} on CPU: torch's own dispatch on the checkpoint's layout")


def _int8_layout(quantization: str, device: torch.device, dtype: torch.dtype) -> WeightLayout:
    from kvloom.layers.int8_weights import plan_for

    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or None; got {quantization!r}")
    if device.type != "cpu":
        raise ConfigError(f"quantization={quantization!r} runs on CPU; the model is on {device.type}, where it is "
                          "not supported (use the float dtype there)")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"quantization={quantization!r} computes in float32 or bfloat16, not "
                          f"{str(dtype).removeprefix('torch.')} (set dtype)")
    return WeightLayout("int8", f"quantization={quantization!r}: int8 weights per output channel, "
                                f"{str(dtype).removeprefix('torch.')} activations and outputs; {plan_for(dtype).describe()}")


@torch.no_grad()
def apply_layout(model: nn.Module, layout: WeightLayout) -> int:
    """Give every ``Linear`` of ``model`` the ``layout``, in place; returns how many layers changed.

    Shapes and values are unchanged (a packed weight reads back with ``to_dense()``). Each weight
    is converted once, so the peak extra memory is one weight.
    """
    if layout.name == "row-major":
        return 0
    if layout.name == "int8":
        return _quantize_int8(model)
    count = 0
    for module in model.modules():
        if isinstance(module, Linear) and module.weight.dim() == 2:
            if layout.name == "onednn-packed":
                module.pack_onednn()
            else:
                module.weight.data = module.weight.data.t().contiguous().t()
            count += 1
    return count


def _quantize_int8(model: nn.Module) -> int:
    """Quantize every ``Linear`` of ``model`` (builds the C kernel; a ``ConfigError`` where it cannot be)."""
    from kvloom.kernels import int8_linear_cpu
    from kvloom.kernels.native import NativeBuildError
    from kvloom.layers.int8_weights import plan_for

    try:
        int8_linear_cpu.load()
    except NativeBuildError as exc:
        raise ConfigError(f"quantization='int8' needs its C kernel, which could not be built here: {exc}") from exc
    linears = [module for module in model.modules() if isinstance(module, Linear)]
    plan = plan_for(linears[0].compute_dtype) if linears else None
    for module in linears:
        module.quantize_int8(int8_linear_cpu, plan)
    return len(linears)

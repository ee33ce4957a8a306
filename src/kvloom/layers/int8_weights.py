"""A linear layer's weight in int8 (``quantization="int8"``): per output channel, symmetric, and the
kernel each step's row count takes.

``q [out, in]`` int8 and ``scale [out]`` float32 with ``weight ~= q * scale[:, None]`` (each element
off by at most ``scale / 2``), ``q`` kept in the kernel's packed layout
(``kvloom.kernels.int8_linear_cpu.pack``); bias and outputs stay in the model's float dtype. Each call
takes one of three kernels by its number of rows ``M``, as the :class:`Int8Plan` for the dtype says
(:func:`plan_for`):

- ``M <= gemv_rows``: kvloom's C kernel, which quantizes the activations per block of 32 and sums each
  block's products in integers, reading each int8 weight once. A decode step of few sequences is
  memory-bound, and it reads a quarter of float32's bytes.
- more rows, ``many_rows="onednn"``: oneDNN's int8 GEMM with activations quantized per token to 7 bits
  (``layers.int8_onednn``), on a second, oneDNN-packed copy of the weights.
- more rows, ``many_rows="dequantize"``: blocks of ``CHUNK_BYTES`` of weight dequantized to the float
  dtype and multiplied by torch's GEMM, one block at a time (the float copy never exists whole);
  activations stay float. For bf16, where the CPU multiplies bf16 in hardware (AMX, AVX512-BF16).

Measured on a 2-core AMD EPYC (AVX2, float32; ``docs/measurements/int8_linear_rows.py``), ms per call
against float32 on oneDNN-packed weights: the C kernel is 3.7-4.5x faster at one row and 1.2-1.6x at 16,
and about float32's speed from 32 rows on; oneDNN's int8 GEMM is slower than it up to ~16-24 rows and
~2x float32 from 64. So in float32: the C kernel up to 16 rows, oneDNN's int8 GEMM above (the C kernel
at every row count where torch has no oneDNN int8 linear). In bf16 (not measured with these kernels
yet): the C kernel up to 8 rows, the CPU's bf16 GEMM on dequantized blocks above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F

from kvloom.layers import int8_onednn

CHUNK_BYTES = 1 << 21
"""Float bytes of weight dequantized at a time on the ``dequantize`` path (a block that stays in L2/L3)."""
GEMV_ROWS_FLOAT32 = 16
"""float32 with oneDNN's int8 GEMM: the most rows the C kernel takes (the measured crossover)."""
GEMV_ROWS_BF16 = 8
"""bf16: the most rows the C kernel takes; above, the CPU's bf16 GEMM on dequantized blocks."""


@dataclass(frozen=True, slots=True)
class Int8Plan:
    """Which kernel takes a call of ``M`` rows: the C kernel when ``gemv_rows`` is None or ``M <= gemv_rows``,
    else ``many_rows``."""

    gemv_rows: int | None
    many_rows: Literal["onednn", "dequantize"]

    def describe(self) -> str:
        """In words, for the logged weight layout."""
        kernel = "int8 x int8 products, activations quantized per block of 32"
        if self.gemv_rows is None:
            return f"{kernel}, at every row count"
        above = ("oneDNN's int8 GEMM (activations per token, 7 bits)" if self.many_rows == "onednn"
                 else "dequantized blocks through the float GEMM")
        return f"{kernel}, up to {self.gemv_rows} rows a step; {above} above"


def plan_for(dtype: torch.dtype, onednn_int8: bool | None = None) -> Int8Plan:
    """The plan in ``dtype``, as measured (module doc). ``onednn_int8``: whether torch's oneDNN int8 linear
    runs here (default: asked, ``int8_onednn.works()``; a parameter so tests decide both branches)."""
    if dtype == torch.bfloat16:
        return Int8Plan(GEMV_ROWS_BF16, "dequantize")
    if int8_onednn.works() if onednn_int8 is None else onednn_int8:
        return Int8Plan(GEMV_ROWS_FLOAT32, "onednn")
    return Int8Plan(None, "dequantize")


@dataclass(slots=True)
class Int8Weights:
    """``packed`` = ``pack(q [out, in])`` int8, ``scale [out]`` float32, ``bias [out]`` float32 or None;
    inputs and outputs in ``dtype``; ``onednn`` the oneDNN-packed copy when the plan takes oneDNN."""

    packed: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    in_features: int
    dtype: torch.dtype
    kernels: ModuleType
    """``kvloom.kernels.int8_linear_cpu`` (loaded: its library is built)."""
    plan: Int8Plan
    onednn: int8_onednn.OnednnWeights | None = None
    _kernel: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, kernels: ModuleType,
                 plan: Int8Plan | None = None) -> Int8Weights:
        """Quantize a dense float ``weight [out, in]`` (per output channel, symmetric); ``plan`` defaults to
        ``plan_for(weight.dtype)``."""
        plan = plan_for(weight.dtype) if plan is None else plan
        q, scale = kernels.quantize_per_channel(weight)
        b = None if bias is None else bias.detach().float().contiguous()
        onednn = int8_onednn.prepack(q) if plan.gemv_rows is not None and plan.many_rows == "onednn" else None
        return cls(kernels.pack(q), scale, b, weight.shape[1], weight.dtype, kernels, plan, onednn)

    @property
    def out_features(self) -> int:
        return int(self.scale.shape[0])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[M, in]`` in ``dtype`` -> ``[M, out]`` in ``dtype``: ``x @ (q * scale).T + bias`` on the kernel
        the plan gives ``M`` rows."""
        rows = self.plan.gemv_rows
        if (rows is None or x.shape[0] <= rows) and self.kernels.supports(x):
            if self._kernel is None:
                self._kernel = self.kernels.bound_linear(self.packed, self.scale, self.bias, self.in_features)
            return self._kernel(x)
        if self.onednn is not None:
            return int8_onednn.linear(x, self.onednn, self.scale, self.bias)
        return self._dequantized_gemm(x)

    def _dequantized_gemm(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        chunk = max(16, CHUNK_BYTES // max(1, k * self.dtype.itemsize)) // 4 * 4
        dequant = self.kernels.int8_dequant_cpu
        if chunk >= n:
            w = dequant(self.packed, self.scale, k, self.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(self.dtype))
        out = torch.empty(x.shape[0], n, dtype=self.dtype)
        buffer = torch.empty(chunk, k, dtype=self.dtype)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            w = dequant(self.packed, self.scale, k, self.dtype, start, stop, out=buffer[: stop - start])
            out[:, start:stop] = F.linear(x, w)
        if self.bias is not None:
            out += self.bias.to(self.dtype)
        return out

    def dequantize(self) -> torch.Tensor:
        """The float weight the kernels multiply by, ``[out, in]`` in ``dtype`` (for tests and references)."""
        q = self.kernels.unpack(self.packed, self.out_features, self.in_features)
        out: torch.Tensor = self.kernels.dequantize_reference(q, self.scale, self.dtype)
        return out

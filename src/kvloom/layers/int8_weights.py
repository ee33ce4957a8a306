"""A linear layer's weight in int8 (``quantization="int8"``): per output channel, symmetric, and the
kernel each step's row count takes.

``q [out, in]`` int8 and ``scale [out]`` float32 with ``weight ~= q * scale[:, None]`` (each element
off by at most ``scale / 2``), ``q`` kept in the kernel's packed layout
(``kvloom.kernels.int8_linear_cpu.pack``); bias and outputs stay in the model's float dtype. Two
kernels, chosen per call by the number of rows ``M`` (:func:`gemv_rows_for`):

- ``M <= gemv_rows``: the C kernel that quantizes the activations per block of 32 and sums each
  block's products in integers, reading each int8 weight once. A decode step of few sequences is
  memory-bound, and it reads a quarter of float32's bytes; with many rows it multiplies int8 by int8
  (32 products an instruction on AVX2).
- more rows: blocks of ``CHUNK_BYTES`` of weight are dequantized to the float dtype and multiplied by
  torch's GEMM, one block at a time (the float copy never exists whole); activations stay float.
  Kept for bf16, where the CPU multiplies bf16 in hardware (AMX, AVX512-BF16).

Measured on a 2-core AMD EPYC (AVX2, float32; ``docs/measurements/int8_linear_rows.py``): the kernel
is 3.7-4.5x float32 (oneDNN-packed) at one row, 1.2-1.6x at 16-32 and within 0.9-1.3x at 48-128,
where the dequantized path is 1.5-3x slower than float32. So in float32 every row count takes the
kernel; in bf16 (not measured with this kernel yet) steps of more than ``GEMV_ROWS_BF16`` rows take
the CPU's bf16 GEMM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F

GEMV_ROWS_BF16 = 8
"""``gemv_rows`` in bf16: above this many rows the CPU's bf16 GEMM takes dequantized blocks."""


def gemv_rows_for(dtype: torch.dtype) -> int | None:
    """The most rows the int8 kernel takes in ``dtype`` (None: every row count), as measured (module doc)."""
    return GEMV_ROWS_BF16 if dtype == torch.bfloat16 else None


def kernel_choice(dtype: torch.dtype) -> str:
    """Which kernel takes which steps in ``dtype``, in words (logged with the weight layout)."""
    rows = gemv_rows_for(dtype)
    if rows is None:
        return "int8 x int8 products (activations quantized per block of 32) at every row count"
    return (f"int8 x int8 products (activations quantized per block of 32) up to {rows} rows a step, "
            "dequantized blocks through the bf16 GEMM above")
CHUNK_BYTES = 1 << 21
"""Float bytes of weight dequantized at a time on the many-rows path (a block that stays in L2/L3)."""


@dataclass(slots=True)
class Int8Weights:
    """``packed`` = ``pack(q [out, in])`` int8, ``scale [out]`` float32, ``bias [out]`` float32 or None;
    inputs and outputs in ``dtype``."""

    packed: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    in_features: int
    dtype: torch.dtype
    kernels: ModuleType
    """``kvloom.kernels.int8_linear_cpu`` (loaded: its library is built)."""
    gemv_rows: int | None = None
    """The most rows the int8 kernel takes (None: all); more go through dequantized blocks."""
    _kernel: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, kernels: ModuleType) -> Int8Weights:
        """Quantize a dense float ``weight [out, in]`` (per output channel, symmetric)."""
        q, scale = kernels.quantize_per_channel(weight)
        b = None if bias is None else bias.detach().float().contiguous()
        return cls(kernels.pack(q), scale, b, weight.shape[1], weight.dtype, kernels, gemv_rows_for(weight.dtype))

    @property
    def out_features(self) -> int:
        return int(self.scale.shape[0])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[M, in]`` in ``dtype`` -> ``[M, out]`` in ``dtype``: ``x @ (q * scale).T + bias``, with ``x``
        quantized per block of 32 when ``M <= gemv_rows``."""
        if (self.gemv_rows is None or x.shape[0] <= self.gemv_rows) and self.kernels.supports(x):
            if self._kernel is None:
                self._kernel = self.kernels.bound_linear(self.packed, self.scale, self.bias, self.in_features)
            return self._kernel(x)
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

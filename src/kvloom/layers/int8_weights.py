"""A linear layer's weight in int8 (``quantization="int8"``): per output channel, symmetric, and the
kernel each step's row count takes.

``q [out, in]`` int8 and ``scale [out]`` float32 with ``weight ~= q * scale[:, None]`` (each element
off by at most ``scale / 2``); activations, bias and outputs stay in the model's float dtype, the
arithmetic in float32. Two kernels (``kvloom.kernels.int8_linear_cpu``), chosen per call by the
number of rows ``M``:

- ``M <= gemv_rows``: the C kernel that reads each int8 weight once and converts it in registers.
  A decode step of few sequences is memory-bound; it reads a quarter of float32's bytes.
- more rows (prefill, large batches): the arithmetic is the limit, so blocks of ``CHUNK_BYTES`` of
  weight are dequantized to the float dtype and multiplied by torch's GEMM, one block at a time
  (the float copy never exists whole).

``gemv_rows`` comes from a measurement on this kind of CPU (``docs/benchmarks.md``); the choice is
logged with the dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

GEMV_ROWS = 8
"""Default ``gemv_rows``: up to this many rows take the int8 kernel (measured crossover, see the module doc)."""
CHUNK_BYTES = 1 << 21
"""Float bytes of weight dequantized at a time on the many-rows path (a block that stays in L2/L3)."""


@dataclass(slots=True)
class Int8Weights:
    """``q [out, in]`` int8, ``scale [out]`` float32, ``bias [out]`` float32 or None; outputs in ``dtype``."""

    q: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype
    kernels: ModuleType
    """``kvloom.kernels.int8_linear_cpu`` (loaded: its library is built)."""
    gemv_rows: int = GEMV_ROWS

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, kernels: ModuleType,
                 gemv_rows: int = GEMV_ROWS) -> Int8Weights:
        """Quantize a dense float ``weight [out, in]`` (per output channel, symmetric)."""
        q, scale = kernels.quantize_per_channel(weight)
        b = None if bias is None else bias.detach().float().contiguous()
        return cls(q, scale, b, weight.dtype, kernels, gemv_rows)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[M, in]`` in ``dtype`` -> ``x @ (q * scale).T + bias``, ``[M, out]`` in ``dtype``."""
        if x.shape[0] <= self.gemv_rows and self.kernels.supports(x, self.q):
            out: torch.Tensor = self.kernels.int8_linear_cpu(x, self.q, self.scale, self.bias)
            return out
        return self._dequantized_gemm(x)

    def _dequantized_gemm(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.q.shape
        chunk = max(16, CHUNK_BYTES // max(1, k * self.dtype.itemsize))
        if chunk >= n:
            w = self.kernels.int8_dequant_cpu(self.q, self.scale, self.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(self.dtype))
        out = torch.empty(x.shape[0], n, dtype=self.dtype)
        buffer = torch.empty(chunk, k, dtype=self.dtype)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            w = self.kernels.int8_dequant_cpu(self.q[start:stop], self.scale[start:stop], self.dtype,
                                              out=buffer[: stop - start])
            out[:, start:stop] = F.linear(x, w)
        if self.bias is not None:
            out += self.bias.to(self.dtype)
        return out

    def dequantize(self) -> torch.Tensor:
        """The float weight the kernels multiply by, ``[out, in]`` in ``dtype`` (for tests and references)."""
        out: torch.Tensor = self.kernels.dequantize_reference(self.q, self.scale, self.dtype)
        return out

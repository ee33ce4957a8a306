"""RMSNorm, computed in float32 like HF's ``LlamaRMSNorm`` (then cast back before the weight)."""

from __future__ import annotations

import torch
from torch import nn

from kvloom.layers.cpu_fusion import FusesOnCpu


class RMSNorm(FusesOnCpu, nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim; ``weight [size]``.

    The weight is allocated uninitialised (``torch.empty``) in ``dtype`` on the default
    device; the loader fills it. After :meth:`fuse_on_cpu`, CPU float32/bf16 ``[T, size]`` inputs
    take one C pass per row (``kvloom.kernels.elementwise_cpu``, the residual add included) instead
    of torch's six; others (the per-head q/k norms' 3-D views, other devices) stay on torch.
    """

    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)

    def _fused(self, x: torch.Tensor) -> bool:
        return self._kernels is not None and self._kernels.supports(x) and x.dtype == self.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., size]`` -> same shape and dtype."""
        if self._fused(x):
            assert self._kernels is not None
            out: torch.Tensor = self._kernels.add_rms_norm_cpu(x, None, self.weight, self.eps)[0]
            return out
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(variance + self.eps)
        return self.weight * x32.to(input_dtype)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual add then norm: returns ``(norm(x + residual), x + residual)``, both ``[T, size]``;
        the inputs are not written."""
        if self._fused(x) and residual.dtype == x.dtype:
            assert self._kernels is not None
            normed, total = self._kernels.add_rms_norm_cpu(x, residual, self.weight, self.eps)
            return normed, total
        residual = x + residual
        return self.forward(residual), residual

"""RMSNorm, computed in float32 like HF's ``LlamaRMSNorm`` (then cast back before the weight)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim; ``weight [size]``.

    The weight is allocated uninitialised (``torch.empty``) in ``dtype`` on the default
    device; the loader fills it.
    """

    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., size]`` -> same shape and dtype."""
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(variance + self.eps)
        return self.weight * x32.to(input_dtype)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual add then norm: returns ``(norm(x + residual), x + residual)``, both ``[T, size]``."""
        residual = x + residual
        return self.forward(residual), residual

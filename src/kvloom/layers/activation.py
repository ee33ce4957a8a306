"""Gated activations."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.layers.cpu_fusion import FusesOnCpu


class SiluAndMul(FusesOnCpu, nn.Module):
    """``[..., 2 * d]`` (gate then up, as fused by ``gate_up_proj``) -> ``silu(gate) * up`` ``[..., d]``.

    After :meth:`fuse_on_cpu`, CPU float32/bf16 matrices take one C pass
    (``kvloom.kernels.elementwise_cpu``) instead of torch's two; anything else stays on torch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = self._kernels
        if kernels is not None and kernels.supports(x):
            fused: Callable[[torch.Tensor], torch.Tensor] = kernels.silu_and_mul_cpu
            return fused(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]

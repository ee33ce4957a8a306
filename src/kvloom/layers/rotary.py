"""Rotary position embedding (neox style: rotate the two halves of each head).

``inv_freq`` is computed exactly as transformers computes it for the ``default``,
``linear`` and ``llama3`` rope types (same float32 ops, on CPU), so cos/sin match HF bit for
bit; the cos/sin tables are precomputed once for every position and gathered by position.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kvloom.layers.cpu_fusion import FusesOnCpu


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Normalized RoPE scaling (``kvloom.models.config`` reads it); ``None`` means plain (``default``) RoPE."""

    rope_type: str
    """``linear`` or ``llama3``."""
    factor: float
    low_freq_factor: float = 1.0
    """llama3 only."""
    high_freq_factor: float = 4.0
    """llama3 only."""
    original_max_position_embeddings: int = 0
    """llama3 only: the pretraining context length."""


def compute_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """``[head_dim // 2]`` float32 inverse frequencies, on CPU, as HF's rope init functions."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type != "llama3":
        raise ValueError(f"unsupported rope_type {scaling.rope_type!r}")
    factor = scaling.factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / scaling.low_freq_factor
    high_freq_wavelen = old_context_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the middle band interpolated.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed, inv_freq_llama)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions ``[0, max_position_embeddings)``.

    Buffers (non-persistent, never in a checkpoint): ``cos_cache`` and ``sin_cache``, each
    ``[max_position_embeddings, head_dim // 2]`` in ``dtype`` (computed in float32 first, as
    HF does before casting), on the default device at construction.
    """

    cos_cache: torch.Tensor
    sin_cache: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_position_embeddings: int,
        theta: float,
        scaling: RopeScaling | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        self.head_dim = head_dim
        inv_freq = compute_inv_freq(head_dim, theta, scaling)
        positions = torch.arange(max_position_embeddings, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :]
        device = torch.get_default_device()
        self.register_buffer("cos_cache", freqs.cos().to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin_cache", freqs.sin().to(device=device, dtype=dtype), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[T]`` int64 -> (cos, sin), each ``[T, 1, head_dim // 2]`` (broadcast over heads)."""
        cos = self.cos_cache.index_select(0, positions).unsqueeze(1)
        sin = self.sin_cache.index_select(0, positions).unsqueeze(1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` (any strides) by ``cos/sin [T, 1, D // 2]``; returns a new ``[T, H, D]``.

    Same arithmetic as HF's ``x * cos + rotate_half(x) * sin`` with ``cos = cat(c, c)``.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class ApplyRotary(FusesOnCpu, nn.Module):
    """``apply_rotary`` as a layer: ``x [T, H, D]``, ``cos/sin [T, 1, D // 2]`` -> a new ``[T, H, D]``.

    After :meth:`fuse_on_cpu`, CPU float32/bf16 inputs take one C pass (``kvloom.kernels.elementwise_cpu``,
    bit-equal to ``apply_rotary``) instead of torch's seven ops; anything else stays on torch.
    """

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        kernels = self._kernels
        if kernels is not None and kernels.supports_rotary(x, cos):
            fused: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = kernels.rotary_cpu
            return fused(x, cos, sin)
        return apply_rotary(x, cos, sin)

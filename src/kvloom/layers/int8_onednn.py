"""Int8 linears for steps of many rows through oneDNN's int8 GEMM (``torch.ops.onednn.qlinear_pointwise``,
torch's own op), with activations quantized per token.

A step of many rows (a prefill chunk, a large batch) is compute-bound; there oneDNN's u8 x s8 GEMM runs
~2x float32 (measured on a 2-core AMD EPYC, AVX2: ``[M, 1024] x [1024, 5632]`` at M = 64 3.3 against
6.6 ms, at 512 18.5 against 38.2; ``[M, 2816] x [2816, 1024]`` at 512 10.4 against 18.3), where
kvloom's own int8 kernel (per-32-block activations) only matches float32.

Activations, per row ``m``: ``s[m] = max_k |x[m, k]| / 63``, ``xq = round(x / s[m]) + 64``: unsigned
8-bit codes of 7 bits of signal around a zero point of 64. Seven bits, because AVX2's u8 x s8
instruction adds pairs of products into 16 bits and saturates: with 8-bit codes (up to 255 x 127,
twice) outputs were off by 4-11% of their range, with 7 bits by 1.6-2.2% (the same shapes; 0.4-0.7%
for the per-32-block kernel). CPUs with VNNI add in 32 bits and could take 8 bits; not measured, so
7 bits everywhere. oneDNN computes ``sum_k (xq - 64) * q[n, k] * scale[n]`` (the weights' per-channel
scales, zero points 0) in float32; the row scale and the bias are applied after it.

The weights are packed for oneDNN once (:func:`prepack`), a second int8 copy beside the GEMV
kernel's (two bytes a weight in all, half of float32's).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

ZERO_POINT = 64
"""The activations' zero point: codes are ``round(x / s) + 64`` in ``[1, 127]``."""
LEVELS = 63
"""The largest ``|round(x / s)|``: seven bits of signal."""


def _ops() -> object | None:
    ops = torch.ops.onednn
    if not (hasattr(ops, "qlinear_prepack") and hasattr(ops, "qlinear_pointwise")):
        return None
    return ops


@dataclass(frozen=True, slots=True)
class OnednnWeights:
    """oneDNN's packed copy of ``q [N, K]`` (an opaque tensor) and the weights' zero points (``[N]`` int64
    zeros: symmetric)."""

    packed: torch.Tensor
    zero_points: torch.Tensor


def prepack(q: torch.Tensor) -> OnednnWeights:
    """``q [N, K]`` int8 (dense) -> its copy packed for oneDNN."""
    ops = _ops()
    if ops is None:
        raise RuntimeError("this torch build has no oneDNN int8 linear (torch.ops.onednn.qlinear_pointwise)")
    packed: torch.Tensor = ops.qlinear_prepack(q, None)  # type: ignore[attr-defined]
    return OnednnWeights(packed, torch.zeros(q.shape[0], dtype=torch.int64))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(codes [M, K] uint8, s [M, 1] float32)``: ``s = max|x| / 63`` per row (1 for an
    all-zero row), ``codes = round(x / s) + 64`` (half to even). Each ``x`` is off by at most ``s / 2``."""
    x32 = x.float()
    s = x32.abs().amax(dim=1, keepdim=True) / LEVELS
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = (torch.round(x32 / s) + ZERO_POINT).to(torch.uint8)
    return codes, s


def linear(x: torch.Tensor, weights: OnednnWeights, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K]`` float32 or bf16 -> ``[M, N]`` in ``x``'s dtype: the float32 result of :func:`reference`
    (to oneDNN's summation order). ``weights`` = ``prepack(q)``, ``scale [N]`` float32, ``bias [N]`` float32
    or None."""
    codes, s = quantize_rows(x)
    out: torch.Tensor = torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, ZERO_POINT, weights.packed, scale, weights.zero_points, None, 1.0, 0, torch.float32, "none",
        [], "")
    out.mul_(s)
    if bias is not None:
        out.add_(bias)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`linear`'s arithmetic in float64 on the dense ``q [N, K]``: ``s[m] * sum_k (codes - 64) * q * scale
    + bias``, cast to ``x``'s dtype."""
    codes, s = quantize_rows(x)
    out = ((codes.double() - ZERO_POINT) @ q.double().T) * scale.double() * s.double()
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)


def rounding_bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[M, N]``: how far :func:`reference` may be from ``x @ w.T`` for any ``w`` that ``q, scale`` quantizes:
    ``sum_k |x_k| scale / 2 + sum_k |q_k| scale s / 2``."""
    _, s = quantize_rows(x)
    weights = x.double().abs().sum(dim=1, keepdim=True) * (scale.double() / 2)[None, :]
    return weights + (s.double() / 2) * (q.double().abs().sum(dim=1) * scale.double())[None, :]


@functools.cache
def works() -> bool:
    """Whether this torch build and CPU run the oneDNN int8 linear and get :func:`reference`'s answer on a
    small product (a build or CPU that cannot says False)."""
    if _ops() is None:
        return False
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8)
    scale = torch.rand(8, generator=g) / 100 + 1e-3
    x = torch.randn(5, 64, generator=g)
    try:
        with torch.no_grad():
            got = linear(x, prepack(q), scale, None)
    except RuntimeError:
        return False
    return bool(torch.allclose(got, reference(x, q, scale, None), rtol=1e-4, atol=1e-4))

"""Linears with int8 weights on the CPU, in C (``csrc/int8_linear_cpu.c``), and their torch references.

Weights are quantized per output channel, symmetric: ``w[n, k] ~= q[n, k] * scale[n]``, ``q`` int8 in
``[-127, 127]``, ``scale`` float32 (:func:`quantize_per_channel`). Activations and outputs stay float32
or bf16; the arithmetic is float32.

- :func:`int8_linear_cpu`: ``x [M, K] -> [M, N]``, each weight read once per step and converted in
  registers (the decode path: few rows, memory-bound, a quarter of float32's weight bytes).
- :func:`int8_dequant_cpu`: ``q, scale -> w [N, K]`` float32 or bf16, for steps with many rows, where a
  float GEMM on a dequantized block wins.

The library is built on first use for this CPU (:mod:`kvloom.kernels.native`).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch

from kvloom.kernels import native

SOURCE = "int8_linear_cpu"
DTYPES = (torch.float32, torch.bfloat16)
K_MULTIPLE = 16
"""The C kernel's inner step: ``in_features`` must be a multiple of it."""


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` (any float dtype) -> ``(q [N, K] int8, scale [N] float32)``, symmetric per row:
    ``scale[n] = max_k |w[n, k]| / 127`` (1 for an all-zero row), ``q = round(w / scale)`` (half to even).
    Each element is off by at most ``scale[n] / 2``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_reference(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q [N, K] int8``, ``scale [N]`` -> ``q * scale`` ``[N, K]`` in ``dtype`` (the torch reference)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch reference of :func:`int8_linear_cpu`: ``x [M, K] @ (q * scale).T + bias`` in float32, cast to
    ``x``'s dtype."""
    out = torch.nn.functional.linear(x.float(), dequantize_reference(q, scale),
                                     None if bias is None else bias.float())
    return out.to(x.dtype)


def supports(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether the C kernel takes ``x [M, K]`` against ``q [N, K]``: CPU, ``x`` float32/bf16 with contiguous
    rows, ``q`` contiguous int8, ``K`` a multiple of 16."""
    return x.device.type == "cpu" and x.dtype in DTYPES and x.dim() == 2 and x.stride(1) == 1 \
        and q.dtype == torch.int8 and q.dim() == 2 and q.is_contiguous() and q.device.type == "cpu" \
        and x.shape[1] == q.shape[1] and q.shape[1] % K_MULTIPLE == 0


def bind(lib: ctypes.CDLL) -> dict[str, Any]:
    """The entry points of a loaded build of ``csrc/int8_linear_cpu.c``, by name."""
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    linear = lib.kvloom_int8_linear
    linear.restype = None
    linear.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i32, i32]
    dequant = lib.kvloom_int8_dequant
    dequant.restype = None
    dequant.argtypes = [ptr, ptr, ptr, i64, i64, i32, i32]
    return {"linear": linear, "dequant": dequant}


@functools.cache
def load() -> dict[str, Any]:
    """This machine's build, built and loaded once per process (raises ``native.NativeBuildError``)."""
    return bind(native.load_library(SOURCE))


def _check_scale(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    n = q.shape[0]
    if scale.dtype != torch.float32 or scale.shape != (n,) or not scale.is_contiguous():
        raise ValueError(f"int8 linear: scale must be a contiguous float32 [{n}], got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"int8 linear: bias must be a contiguous float32 [{n}], got {bias.dtype} {tuple(bias.shape)}")


def int8_linear_cpu(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K]`` (``supports(x, q)``), ``q [N, K]`` int8, ``scale [N]`` float32, ``bias [N]`` float32 or None
    -> ``x @ (q * scale).T + bias``, a new contiguous ``[M, N]`` in ``x``'s dtype (float32 sums; rounded once
    to bf16 for bf16). Results do not depend on the thread count."""
    if not supports(x, q):
        raise ValueError(f"int8_linear_cpu: need a CPU float32/bf16 x [M, K] with contiguous rows and a contiguous "
                         f"int8 q [N, K], K % {K_MULTIPLE} == 0; got x {x.dtype} {tuple(x.shape)} strides {x.stride()}, "
                         f"q {q.dtype} {tuple(q.shape)}")
    _check_scale(q, scale, bias)
    rows, (n, k) = x.shape[0], q.shape
    out = torch.empty(rows, n, dtype=x.dtype)
    if rows and n:
        load()["linear"](x.data_ptr(), x.stride(0), q.data_ptr(), scale.data_ptr(),
                         None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), rows, n, k,
                         torch.get_num_threads(), int(x.dtype == torch.bfloat16))
    return out


def int8_dequant_cpu(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``q [N, K]`` contiguous int8, ``scale [N]`` float32 -> ``q * scale`` ``[N, K]`` in ``dtype`` (float32 or
    bf16, rounded once), written into ``out`` when given (a contiguous ``[N, K]`` of that dtype)."""
    if q.dtype != torch.int8 or q.dim() != 2 or not q.is_contiguous() or dtype not in DTYPES:
        raise ValueError(f"int8_dequant_cpu: need a contiguous int8 [N, K] and float32/bf16, got {q.dtype} "
                         f"{tuple(q.shape)} -> {dtype}")
    _check_scale(q, scale, None)
    n, k = q.shape
    if out is None:
        out = torch.empty(n, k, dtype=dtype)
    elif out.shape != (n, k) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"int8_dequant_cpu: out must be a contiguous {dtype} [{n}, {k}]")
    if n and k:
        load()["dequant"](q.data_ptr(), scale.data_ptr(), out.data_ptr(), n, k, torch.get_num_threads(),
                          int(dtype == torch.bfloat16))
    return out

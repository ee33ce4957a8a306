"""Fused elementwise ops of a decoder layer on the CPU, in C (``csrc/elementwise_cpu.c``).

``silu_and_mul_cpu``: ``[T, 2I] -> [T, I]``, ``silu(gate) * up`` in one pass (torch makes two passes and
a temporary). ``add_rms_norm_cpu``: the residual add and the RMSNorm in one pass per row (torch makes
six: add, pow, mean, add, rsqrt, two multiplies). ``rotary_cpu``: rotary embedding of a ``[T, H, D]``
view in one pass, bit-equal to torch's four multiplies, add, subtract and cat. float32 and bfloat16,
float32 arithmetic, rounding to bf16 where the torch reference (``kvloom.layers``, HF's modules)
rounds; the norm's and the activation's sums run in a different order than torch's, so their results
may differ from it in the last bit. Rows are one thread's work each:
the thread count never changes a result.

The library is built on first use for this CPU (:mod:`kvloom.kernels.native`); :func:`load` builds it
eagerly.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch

from kvloom.kernels import native

SOURCE = "elementwise_cpu"
DTYPES = (torch.float32, torch.bfloat16)


def supports(x: torch.Tensor) -> bool:
    """Whether ``x`` (``[T, N]``) can go to these kernels: a CPU float32/bf16 matrix with contiguous rows
    and ``N`` a multiple of 16 (a gate|up row's halves are then multiples of 8; a norm's row must be a multiple of 16)."""
    return x.device.type == "cpu" and x.dtype in DTYPES and x.dim() == 2 and x.stride(1) == 1 \
        and x.shape[1] % 16 == 0


def bind(lib: ctypes.CDLL) -> dict[str, Any]:
    """The entry points of a loaded build of ``csrc/elementwise_cpu.c``, by name."""
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    silu = lib.kvloom_silu_and_mul
    silu.restype = None
    silu.argtypes = [ptr, i64, ptr, i64, i64, i64, i32, i32]
    norm = lib.kvloom_add_rms_norm
    norm.restype = None
    norm.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_float, i32, i32]
    rotary = lib.kvloom_rotary
    rotary.restype = None
    rotary.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, i32, i32, i32, i32]
    return {"silu_and_mul": silu, "add_rms_norm": norm, "rotary": rotary}


@functools.cache
def load() -> dict[str, Any]:
    """This machine's build, built and loaded once per process (raises ``native.NativeBuildError``)."""
    return bind(native.load_library(SOURCE))


def silu_and_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, 2I]`` (``supports(x)``) -> ``silu(x[:, :I]) * x[:, I:]``, a new contiguous ``[T, I]``."""
    if not supports(x):
        raise ValueError(f"silu_and_mul_cpu: need a CPU float32/bf16 [T, 2I] with contiguous rows and I % 8 == 0, "
                         f"got {x.dtype} {tuple(x.shape)} strides {x.stride()} on {x.device}")
    rows, width = x.shape
    out = torch.empty(rows, width // 2, dtype=x.dtype)
    if rows:
        load()["silu_and_mul"](x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), rows, width // 2,
                               native.threads_for(rows), int(x.dtype == torch.bfloat16))
    return out


def add_rms_norm_cpu(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(s) * weight, s)`` for ``s = x + residual`` (``s = x`` when ``residual`` is None), all
    ``[T, H]`` in one dtype; ``x``/``residual`` contiguous, ``weight`` ``[H]``. Inputs are never written."""
    x = x.contiguous()
    if not supports(x) or (residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype)) \
            or weight.shape != (x.shape[1],) or weight.dtype != x.dtype:
        raise ValueError(f"add_rms_norm_cpu: x {x.dtype} {tuple(x.shape)}, residual "
                         f"{None if residual is None else (residual.dtype, tuple(residual.shape))}, weight "
                         f"{weight.dtype} {tuple(weight.shape)} do not fit")
    rows, hidden = x.shape
    out = torch.empty_like(x)
    total = x if residual is None else torch.empty_like(x)
    residual = None if residual is None else residual.contiguous()
    weight = weight.contiguous()
    if rows:
        load()["add_rms_norm"](x.data_ptr(), None if residual is None else residual.data_ptr(),
                               None if residual is None else total.data_ptr(), out.data_ptr(), weight.data_ptr(),
                               rows, hidden, eps, native.threads_for(rows), int(x.dtype == torch.bfloat16))
    return out, total


def supports_rotary(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether ``rotary_cpu`` takes ``x`` ``[T, H, D]`` and its ``cos``/``sin`` tables: CPU float32/bf16, ``x``'s
    last dimension contiguous and even, the tables ``[T, D/2]`` (or ``[T, 1, D/2]``) in ``x``'s dtype."""
    return x.device.type == "cpu" and x.dtype in DTYPES and x.dim() == 3 and x.stride(2) == 1 \
        and x.shape[2] % 2 == 0 and cos.dtype == x.dtype and cos.device.type == "cpu" \
        and cos.dim() in (2, 3) and cos.shape[0] == x.shape[0] and cos.shape[-1] == x.shape[2] // 2 \
        and cos.numel() == x.shape[0] * (x.shape[2] // 2)


def rotary_cpu(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (neox halves) of ``x`` ``[T, H, D]`` (any strides, last dimension contiguous) by ``cos``,
    ``sin`` ``[T, D/2]`` or ``[T, 1, D/2]``: a new contiguous ``[T, H, D]`` equal to
    ``cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)`` computed by torch, bit for bit."""
    if not supports_rotary(x, cos) or sin.shape != cos.shape or sin.dtype != cos.dtype:
        raise ValueError(f"rotary_cpu: x {x.dtype} {tuple(x.shape)} strides {x.stride()}, cos {cos.dtype} "
                         f"{tuple(cos.shape)}, sin {sin.dtype} {tuple(sin.shape)} do not fit")
    tokens, heads, head_dim = x.shape
    cos = cos.reshape(tokens, head_dim // 2)
    sin = sin.reshape(tokens, head_dim // 2)
    if cos.stride(1) != 1 or sin.stride(1) != 1 or cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(tokens, heads, head_dim, dtype=x.dtype)
    if tokens and heads:
        load()["rotary"](x.data_ptr(), x.stride(0), x.stride(1), out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                         cos.stride(0), tokens, heads, head_dim, native.threads_for(tokens), int(x.dtype == torch.bfloat16))
    return out

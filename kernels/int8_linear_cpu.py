"""Linears with int8 weights on the CPU, in C (``csrc/int8_linear_cpu.c``), and their torch references.

Weights are quantized per output channel, symmetric: ``w[n, k] ~= q[n, k] * scale[n]``, ``q`` int8 in
``[-127, 127]``, ``scale`` float32 (:func:`quantize_per_channel`), and stored packed (:func:`pack`): a
block of 4 channels is one contiguous run of memory, so the kernel streams the weights front to back.
Activations are quantized on the fly per block of 32 (llama.cpp's Q8_0 way: ``xs = max|x| / 127``,
``xq = round(x / xs)``) and each block's products are summed exactly in integers; outputs are float32 or
bf16.

- :func:`int8_linear_cpu`: ``x [M, K] -> [M, N]``, each weight read once per call (the decode path: few
  rows, memory-bound, a quarter of float32's weight bytes).
- :func:`int8_dequant_cpu`: packed ``q, scale -> w`` float32 or bf16, for steps with many rows, where a
  float GEMM on a dequantized block wins.
- :func:`int8_linear_reference`: the same arithmetic in torch (float64), the kernel's reference.

The library is built on first use for this CPU (:mod:`kvloom.kernels.native`).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

import torch

from kvloom.kernels import native

SOURCE = "int8_linear_cpu"
DTYPES = (torch.float32, torch.bfloat16)
QBLOCK = 32
"""Activations share one scale per block of this many consecutive elements of a row; ``K`` is padded to it."""
NBLOCK = 4
"""Output channels per packed block; ``N`` is padded to it."""


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` (any float dtype) -> ``(q [N, K] int8, scale [N] float32)``, symmetric per row:
    ``scale[n] = max_k |w[n, k]| / 127`` (1 for an all-zero row), ``q = round(w / scale)`` (half to even).
    Each element is off by at most ``scale[n] / 2``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def pack(q: torch.Tensor) -> torch.Tensor:
    """``q [N, K]`` int8 -> the kernel's layout ``[Np / 4, Kp / 32, 4, 32]`` (``N`` and ``K`` padded with zeros
    to multiples of 4 and 32): ``packed[n // 4, k // 32, n % 4, k % 32] = q[n, k]``, contiguous."""
    n, k = q.shape
    padded = torch.zeros(_round_up(n, NBLOCK), _round_up(k, QBLOCK), dtype=torch.int8)
    padded[:n, :k] = q
    blocks = padded.view(padded.shape[0] // NBLOCK, NBLOCK, padded.shape[1] // QBLOCK, QBLOCK)
    return blocks.permute(0, 2, 1, 3).contiguous()


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of :func:`pack`: ``[Np / 4, Kp / 32, 4, 32]`` -> ``q [n, k]`` int8, contiguous."""
    nb, kb = packed.shape[0], packed.shape[1]
    return packed.permute(0, 2, 1, 3).reshape(nb * NBLOCK, kb * QBLOCK)[:n, :k].contiguous()


def dequantize_reference(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q [N, K] int8`` (dense, not packed), ``scale [N]`` -> ``q * scale`` ``[N, K]`` in ``dtype``."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def quantize_activations_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(xq [M, Kp] int8, xs [M, Kp / 32] float32)``, ``K`` padded with zeros to ``Kp``, a
    multiple of 32: per block of 32, ``xs = max|x| / 127`` and ``xq = round(x / xs)`` (half to even; 0 where
    the block is all zero). Each element is off by at most ``xs / 2``."""
    m, k = x.shape
    padded = torch.zeros(m, _round_up(k, QBLOCK), dtype=torch.float32)
    padded[:, :k] = x.float()
    blocks = padded.view(m, -1, QBLOCK)
    xs = blocks.abs().amax(dim=2) / 127.0
    safe = torch.where(xs > 0, xs, torch.ones_like(xs))
    xq = torch.where(xs[..., None] > 0, torch.round(blocks / safe[..., None]), torch.zeros_like(blocks))
    return xq.clamp_(-127, 127).to(torch.int8).view(m, -1), xs


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch reference of :func:`int8_linear_cpu` (``q [N, K]`` dense): activations quantized as
    :func:`quantize_activations_reference`, ``out[m, n] = scale[n] * sum_b xs[m, b] * (xq[m, b] . q[n, b]) +
    bias[n]`` in float64, cast to ``x``'s dtype."""
    n, k = q.shape
    xq, xs = quantize_activations_reference(x)
    qd = torch.zeros(n, xq.shape[1], dtype=torch.float64)
    qd[:, :k] = q.double()
    per_block = torch.einsum("mbj,nbj->mnb", xq.double().view(x.shape[0], -1, QBLOCK), qd.view(n, -1, QBLOCK))
    out = (per_block * xs.double()[:, None, :]).sum(dim=2) * scale.double()
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)


def rounding_bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[M, N]``: how far :func:`int8_linear_reference` may be from ``x @ w.T`` for any float ``w`` that
    ``q, scale`` quantizes (:func:`quantize_per_channel`): each weight is off by at most ``scale / 2`` and
    each activation by at most its block's ``xs / 2``, so the error is at most
    ``sum_k |x_k| scale / 2 + sum_k |q_k| scale xs_b(k) / 2`` (plus float32 rounding, not counted)."""
    k = q.shape[1]
    _, xs = quantize_activations_reference(x)
    xs_per_k = xs.double().repeat_interleave(QBLOCK, dim=1)[:, :k]
    weight_part = x.double().abs().sum(dim=1, keepdim=True) * (scale.double() / 2)[None, :]
    activation_part = (xs_per_k / 2) @ q.double().abs().T * scale.double()[None, :]
    return weight_part + activation_part


def supports(x: torch.Tensor) -> bool:
    """Whether the C kernel takes ``x``: a CPU float32/bf16 ``[M, K]`` with contiguous rows."""
    return x.device.type == "cpu" and x.dtype in DTYPES and x.dim() == 2 and x.stride(1) == 1


def bind(lib: ctypes.CDLL) -> dict[str, Any]:
    """The entry points of a loaded build of ``csrc/int8_linear_cpu.c``, by name."""
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    linear = lib.kvloom_int8_linear
    linear.restype = i32
    linear.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i32, i32]
    dequant = lib.kvloom_int8_dequant
    dequant.restype = None
    dequant.argtypes = [ptr, ptr, ptr, i64, i64, i64, i32, i32]
    return {"linear": linear, "dequant": dequant}


@functools.cache
def load() -> dict[str, Any]:
    """This machine's build, built and loaded once per process (raises ``native.NativeBuildError``)."""
    return bind(native.load_library(SOURCE))


def _check_weights(packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, k: int) -> None:
    n = scale.shape[0] if scale.dim() == 1 else -1
    if scale.dtype != torch.float32 or n < 0 or not scale.is_contiguous():
        raise ValueError(f"int8 linear: scale must be a contiguous float32 [N], got {scale.dtype} {tuple(scale.shape)}")
    want = (_round_up(n, NBLOCK) // NBLOCK, _round_up(k, QBLOCK) // QBLOCK, NBLOCK, QBLOCK)
    if packed.dtype != torch.int8 or tuple(packed.shape) != want or not packed.is_contiguous() \
            or packed.device.type != "cpu":
        raise ValueError(f"int8 linear: packed weights must be a contiguous CPU int8 {want} (pack() of [{n}, {k}]), "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"int8 linear: bias must be a contiguous float32 [{n}], got {bias.dtype} {tuple(bias.shape)}")


def int8_linear_cpu(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K]`` (``supports(x)``), ``packed`` = ``pack(q [N, K])``, ``scale [N]`` float32, ``bias [N]``
    float32 or None -> :func:`int8_linear_reference`'s result (float32 sums), a new contiguous ``[M, N]`` in
    ``x``'s dtype. Results do not depend on the thread count."""
    if not supports(x):
        raise ValueError(_bad_input(x, None))
    return bound_linear(packed, scale, bias, x.shape[1])(x)


def _bad_input(x: torch.Tensor, k: int | None) -> str:
    return (f"int8_linear_cpu: need a CPU float32/bf16 x [M, {'K' if k is None else k}] with contiguous rows; "
            f"got x {x.dtype} {tuple(x.shape)} strides {x.stride()}")


def int8_dequant_cpu(packed: torch.Tensor, scale: torch.Tensor, k: int, dtype: torch.dtype = torch.float32,
                     start: int = 0, stop: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``start .. stop - 1`` (``start`` a multiple of 4; ``stop`` defaults to ``N``) of ``q * scale`` from
    ``packed`` = ``pack(q [N, k])`` -> ``[stop - start, k]`` in ``dtype`` (float32 or bf16, rounded once),
    written into ``out`` when given (a contiguous tensor of that shape and dtype)."""
    _check_weights(packed, scale, None, k)
    n = scale.shape[0]
    stop = n if stop is None else stop
    if dtype not in DTYPES or not 0 <= start <= stop <= n or start % NBLOCK:
        raise ValueError(f"int8_dequant_cpu: need float32/bf16 and 0 <= start <= stop <= {n}, start % {NBLOCK} == 0; "
                         f"got {dtype}, {start}..{stop}")
    rows = stop - start
    if out is None:
        out = torch.empty(rows, k, dtype=dtype)
    elif out.shape != (rows, k) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"int8_dequant_cpu: out must be a contiguous {dtype} [{rows}, {k}]")
    if rows and k:
        load()["dequant"](packed.data_ptr(), scale.data_ptr(), out.data_ptr(), start, rows, k, torch.get_num_threads(),
                          int(dtype == torch.bfloat16))
    return out


def bound_linear(packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`int8_linear_cpu` with its weights checked once: ``x -> int8_linear_cpu(x, packed, scale, bias)``
    for ``x [M, k]`` (``supports(x)``; anything else raises ``ValueError``). A decode step makes one call per
    linear layer, so the per-call checks are what is left: a few microseconds a call against ~13."""
    _check_weights(packed, scale, bias, k)
    fn = load()["linear"]
    n = scale.shape[0]
    weights = (packed.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr())

    def call(x: torch.Tensor) -> torch.Tensor:
        if not supports(x) or x.shape[1] != k:
            raise ValueError(_bad_input(x, k))
        rows = x.shape[0]
        out = torch.empty(rows, n, dtype=x.dtype)
        if rows and n and k:
            if fn(x.data_ptr(), x.stride(0), *weights, out.data_ptr(), n, rows, n, k, torch.get_num_threads(),
                  int(x.dtype == torch.bfloat16)):
                raise MemoryError(f"int8_linear_cpu: no memory for {rows} x {k} quantized activations")
        elif rows and n:  # K = 0: the sum is empty
            out.copy_(bias.to(x.dtype).expand(rows, n) if bias is not None else torch.zeros(rows, n, dtype=x.dtype))
        return out

    return call

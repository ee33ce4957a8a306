"""Which dtype the model runs in, and why.

``dtype="auto"`` means: on a GPU, the checkpoint's own dtype; on a CPU, bfloat16 where the CPU
multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16), float32 everywhere else.
The difference is large both ways: on a Xeon with AMX, torch's bf16 GEMMs run ~3.5x faster
than fp32 at serving batch sizes; on a CPU without either unit (an AVX2-only EPYC), bf16
matmuls are emulated and run hundreds of times slower than fp32.

What the CPU can do is asked of torch (``kvloom.layers.cpu_support.CpuMatmulSupport``, re-exported
here). ``CpuMatmulSupport`` can be passed in, so both branches are tested on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvloom.errors import ConfigError
from kvloom.layers.cpu_support import CpuMatmulSupport

__all__ = ["DTYPES", "CpuMatmulSupport", "DTypeChoice", "choose_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class DTypeChoice:
    """The dtype weights and KV are held in, and the reason, for logs, stats and benchmark headers."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def choose_dtype(requested: str, checkpoint_dtype: torch.dtype, device: torch.device,
                 cpu: CpuMatmulSupport | None = None) -> DTypeChoice:
    """Resolve ``requested`` (``"auto"`` or a name in ``DTYPES``) for ``device``; ``cpu`` is the
    CPU's support (default: ``CpuMatmulSupport.probe()``, asked only for ``auto`` on CPU)."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {requested!r}")
        return DTypeChoice(DTYPES[requested], f"dtype={requested!r} was asked for")
    if device.type != "cpu":
        return DTypeChoice(checkpoint_dtype, f"auto on {device.type}: the checkpoint's dtype")
    support = cpu if cpu is not None else CpuMatmulSupport.probe()
    if support.fast_bf16:
        return DTypeChoice(torch.bfloat16, f"auto on CPU: {support.describe()} multiply bf16 in hardware")
    return DTypeChoice(torch.float32, f"auto on CPU: {support.describe()}, so bf16 matmuls would be emulated "
                                      "(far slower than float32)")


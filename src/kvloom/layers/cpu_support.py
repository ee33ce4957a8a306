"""What this CPU's matrix units can do, asked of torch: the one place kvloom asks.

Asked through ``torch.cpu._is_amx_tile_supported`` and ``torch.cpu._is_avx512_bf16_supported`` (the
checks torch's own kernels dispatch on), never read from ``/proc/cpuinfo`` strings. Everything that
decides by capability (``dtype="auto"``, which prefills the CPU attention backend hands to SDPA) reads
``CpuMatmulSupport.probe()``, so faking that one method fakes the machine for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class CpuMatmulSupport:
    """Whether this CPU has hardware bf16 matrix units."""

    amx: bool
    """AMX tiles (Sapphire Rapids and later: AMX-BF16 and AMX-INT8)."""
    avx512_bf16: bool
    """AVX512-BF16 dot products (Cooper Lake, Sapphire Rapids, Zen 4 and later)."""

    @classmethod
    def probe(cls) -> CpuMatmulSupport:
        """Ask torch (False where this torch build lacks the check)."""
        return cls(amx=_ask("_is_amx_tile_supported"), avx512_bf16=_ask("_is_avx512_bf16_supported"))

    @property
    def fast_bf16(self) -> bool:
        return self.amx or self.avx512_bf16

    def describe(self) -> str:
        units = [name for name, has in (("AMX", self.amx), ("AVX512-BF16", self.avx512_bf16)) if has]
        return " and ".join(units) if units else "no AMX or AVX512-BF16"


def _ask(check: str) -> bool:
    fn = getattr(torch.cpu, check, None)
    return bool(fn()) if callable(fn) else False

"""Attention backends: write a step's new K/V into the paged cache, then attend over the cache.

A backend owns no state: the runner owns the caches (``[num_blocks, block_size, Hkv, D]`` per
layer) and builds one :class:`AttentionMetadata` per step that every layer shares. Backends are
picked by name from a registry (:func:`get_attention_backend`); each backend imports its kernels
when it is built, so importing this module never imports triton.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from kvloom.layers.attention_metadata import AttentionMetadata
from kvloom.layers.cpu_support import CpuMatmulSupport

if TYPE_CHECKING:
    from kvloom.kernels.paged_decode_attention import DecodeGroup
    from kvloom.kernels.paged_prefill_attention import PrefillSeq

logger = logging.getLogger(__name__)


class AttentionBackend(ABC):
    """Paged attention over one step's flattened batch (decodes first, then prefills).

    The caller owns the caches and the metadata; a backend keeps no per-step state, so one
    instance serves every layer.
    """

    name: ClassVar[str]
    reason: str = "chosen by name"
    """Why this backend runs (set by :func:`get_attention_backend`; shown in ``engine.stats()``)."""
    supports_cuda_graphs: ClassVar[bool] = False
    """Whether a forward may be captured in a CUDA graph and replayed with new metadata tensors: true
    only when every kernel reads lengths and tables on the device, never from the host lists."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Store ``k``/``v`` at ``meta.slot_mapping``, then attend every query row over the cache.

        Args:
            q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]`` with ``Hq % Hkv == 0``.
            k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, updated in place.
            meta: the step's metadata; rows ``[0, num_decodes)`` are the decode tokens.
            scale: softmax scale, usually ``D ** -0.5``.

        Returns:
            ``[T, Hq, D]`` in ``q``'s dtype. Rows past ``query_start_loc[-1]`` (padding) are unspecified.
        """


class PagedAttentionBackend(AttentionBackend):
    """Runs three ``kvloom.kernels`` ops, each planning for itself on every call: ``store_kv``,
    then ``decode`` on the decode rows (one batched call) and ``prefill`` on the rest, both
    writing into one preallocated output. The device kernels need nothing planned on the host;
    the torch backend, which does, plans once per step instead (``TorchAttentionBackend``).

    ``prefill`` takes ``(..., query_start_loc_cpu, seq_lens_cpu, out=)``.

    A decode-only step reads the host lists for nothing but the largest length, which picks the
    decode kernel's key tile; a captured graph keeps the tile it was captured with, and every tile
    is correct for every length, so decode-only steps may be captured (``supports_cuda_graphs``).
    """

    supports_cuda_graphs: ClassVar[bool] = True

    def __init__(self, store_kv: Callable[..., None], decode: Callable[..., torch.Tensor],
                 prefill: Callable[..., torch.Tensor]) -> None:
        self._store_kv = store_kv
        self._decode = decode
        self._prefill = prefill

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self._store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        num_decodes = meta.num_decodes
        out = torch.empty_like(q)
        if num_decodes > 0:
            self._decode(q[:num_decodes], k_cache, v_cache, meta.block_tables[:num_decodes],
                         meta.seq_lens[:num_decodes], scale, max(meta.seq_lens_cpu[:num_decodes]),
                         out=out[:num_decodes])
        if num_decodes < meta.num_seqs:
            # Prefill sequences own rows [qsl[num_decodes], T): rebase their query_start_loc to 0.
            base = meta.query_start_loc_cpu[num_decodes]
            query_start_loc = meta.query_start_loc[num_decodes:]
            self._prefill(
                q[base:], k_cache, v_cache, meta.block_tables[num_decodes:],
                query_start_loc - base if base else query_start_loc, meta.seq_lens[num_decodes:], scale,
                meta.max_query_len, meta.max_seq_len,
                [loc - base for loc in meta.query_start_loc_cpu[num_decodes:]], meta.seq_lens_cpu[num_decodes:],
                out=out[base:],
            )
        return out


@dataclass(frozen=True, slots=True)
class _TorchStepPlan:
    """What every layer of one step shares on the torch path, built by the first layer."""

    has_padding: bool
    """Some ``slot_mapping`` entry is -1."""
    decode_groups: list[DecodeGroup]
    """The decode rows, in groups of similar length."""
    prefill: list[PrefillSeq]
    """The prefill sequences, rows counted from the step's first token."""


class TorchAttentionBackend(AttentionBackend):
    """Pure-torch attention: the CPU path where the C decode kernel cannot be built (and a fallback anywhere).

    The first layer of a step plans it (``meta.backend_plan``): decode rows split into groups of
    similar length with their gather indices, padding indices and masks; each prefill's block ids
    and chunk mask; whether any slot is padding. Every layer then runs the same plan: ``store_kv``,
    one batched SDPA call per decode group over a padded K/V gather, one SDPA call per prefill
    (a fresh prompt attends this step's K/V in place, with no gather). Lengths come from the
    metadata's host lists: no device syncs.
    """

    name: ClassVar[str] = "torch"

    def __init__(self) -> None:
        from kvloom.kernels import paged_decode_attention, paged_prefill_attention, store_kv

        self._decode = paged_decode_attention
        self._prefill = paged_prefill_attention
        self._store_kv = store_kv.store_kv_ref
        # One scratch buffer shared by all layers: the engine thread runs them one after another.
        self._workspace = paged_decode_attention.GatherWorkspace()

    def plan(self, meta: AttentionMetadata, block_size: int) -> _TorchStepPlan:
        """The step's plan, built once (by the first layer) and kept on ``meta``."""
        plan = meta.backend_plan
        if isinstance(plan, _TorchStepPlan):
            return plan
        n = meta.num_decodes
        groups = []
        if n:
            groups = self._decode.plan_decode(meta.block_tables[:n], meta.seq_lens_cpu[:n], block_size)
        prefill = []
        if n < meta.num_seqs:
            prefill = self._prefill.plan_prefill(
                meta.block_tables[n:], meta.query_start_loc_cpu[n:], meta.seq_lens_cpu[n:], block_size
            )
        plan = _TorchStepPlan(bool((meta.slot_mapping < 0).any()), groups, prefill)
        meta.backend_plan = plan
        return plan

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        plan = self.plan(meta, k_cache.shape[1])
        self._store_kv(k, v, k_cache, v_cache, meta.slot_mapping, has_padding=plan.has_padding)
        out = torch.empty_like(q)
        n = meta.num_decodes
        if plan.decode_groups:
            self._decode.paged_decode_attention_planned(q[:n], k_cache, v_cache, plan.decode_groups, scale, out=out[:n],
                                                        workspace=self._workspace)
        if plan.prefill:
            # Prefill rows keep their step-wide numbering: the plan's starts index q, k and v directly.
            self._prefill.paged_prefill_attention_planned(q, k_cache, v_cache, plan.prefill, scale, out=out, new_k=k, new_v=v)
        return out


@dataclass(frozen=True, slots=True)
class _CpuStepPlan:
    """What every layer of one step shares on the C path, built by the first layer."""

    has_padding: bool
    """Some ``slot_mapping`` entry is -1."""
    row_seq: torch.Tensor
    """``[T]`` int32: the sequence (``block_tables`` row) of each query row."""
    row_lens: torch.Tensor
    """``[T]`` int32: the keys each row attends (its position + 1); 0 for padding rows and for the rows
    of the prefills SDPA takes."""
    long_prefill: list[PrefillSeq]
    """Prefills over more keys than ``CpuAttentionBackend.max_kernel_prefill_keys``, for SDPA."""


class CpuAttentionBackend(TorchAttentionBackend):
    """The CPU production path: one C kernel call a layer (``kvloom.kernels.paged_decode_attention_cpu``)
    attends every decode row and every row of a prefill over at most ``max_kernel_prefill_keys`` keys,
    each over its sequence's K/V blocks where they lie: no padded gathers for decode, no gather for a
    chunk over a cached prefix, no per-prompt SDPA calls. Longer prefills go to SDPA, as on the torch
    backend; ``store_kv`` stays on torch. Caches the kernel does not take (a dtype other than
    float32/bf16, a head size that is not a multiple of 8) run the torch backend's path.

    Building it compiles the kernel for this CPU (once per machine kind; cached on disk) and raises
    ``NativeBuildError`` where that is impossible: ``get_attention_backend("auto")`` then falls back
    to ``"torch"`` and says why.
    """

    name: ClassVar[str] = "cpu"
    MAX_KERNEL_PREFILL_KEYS: ClassVar[int] = 1024
    """Row by row, the kernel re-reads a prompt's K/V for each query row; SDPA's blocked kernel reuses
    them. Measured on a 2-core AMD EPYC (Hq 16, Hkv 4, D 64, float32): the kernel takes a causal prompt
    of L tokens 1.4-1.5x faster than SDPA for L = 64-512, 1.1x at 1024, 0.89x at 2048."""
    MAX_KERNEL_PREFILL_KEYS_AMX_BF16: ClassVar[int] = 32
    """The same limit for bf16 caches on a CPU with AMX, where SDPA's flash kernel multiplies bf16 blocks
    on the AMX tiles. Measured on a 2-core Intel Xeon with AMX (same shapes, bf16, ms per causal prompt,
    kernel against SDPA): L=32 0.054/0.049, 64 0.138/0.088, 128 0.42/0.21, 256 1.85/0.50, 512 6.5/1.75.
    In float32 the same machine's SDPA is no faster than the kernel up to 512 tokens."""

    def __init__(self, amx: bool | None = None) -> None:
        """``amx``: whether the CPU has AMX tiles (default: ``CpuMatmulSupport.probe()``), so tests decide both
        ways."""
        super().__init__()
        from kvloom.kernels import kv_int8, paged_decode_attention_cpu

        paged_decode_attention_cpu.load()
        self._native = paged_decode_attention_cpu
        self._kv_int8 = kv_int8
        self.amx = CpuMatmulSupport.probe().amx if amx is None else amx

    def max_kernel_prefill_keys(self, dtype: torch.dtype) -> int:
        """Prefills over more keys than this go to SDPA (see the two limits above)."""
        if dtype == torch.bfloat16 and self.amx:
            return self.MAX_KERNEL_PREFILL_KEYS_AMX_BF16
        return self.MAX_KERNEL_PREFILL_KEYS

    def _takes(self, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        quantized = self._kv_int8.is_int8(k_cache)
        return q.device.type == "cpu" and (quantized or q.dtype == k_cache.dtype) and self._native.supports(
            k_cache.dtype, self._kv_int8.head_dim(k_cache))

    def plan_rows(self, meta: AttentionMetadata, block_size: int, num_rows: int,
                  dtype: torch.dtype = torch.float32) -> _CpuStepPlan:
        """The step's row plan, built once (by the first layer) and kept on ``meta``, from the host lists;
        ``dtype`` is the cache's (it decides which prefills SDPA takes)."""
        plan = meta.backend_plan
        if isinstance(plan, _CpuStepPlan):
            return plan
        starts, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
        num_seqs = meta.num_seqs
        query_lens = torch.tensor([starts[b + 1] - starts[b] for b in range(num_seqs)], dtype=torch.int64)
        seqs = torch.arange(num_seqs, dtype=torch.int64)
        row_seq = torch.zeros(num_rows, dtype=torch.int32)
        row_lens = torch.zeros(num_rows, dtype=torch.int32)
        real = starts[num_seqs] if num_seqs else 0
        if real:
            seq_of_row = torch.repeat_interleave(seqs, query_lens)
            first_pos = torch.tensor(lens, dtype=torch.int64) - query_lens  # position of each sequence's first row
            offset = torch.arange(real) - torch.tensor(starts[:num_seqs], dtype=torch.int64)[seq_of_row]
            row_seq[:real] = seq_of_row.to(torch.int32)
            row_lens[:real] = (first_pos[seq_of_row] + offset + 1).to(torch.int32)
        max_keys = self.max_kernel_prefill_keys(dtype)
        long = [b for b in range(meta.num_decodes, num_seqs) if lens[b] > max_keys and starts[b + 1] - starts[b] > 1]
        long_prefill = []
        for b in long:
            row_lens[starts[b]:starts[b + 1]] = 0
            # Rows keep their step-wide numbering, as on the torch path.
            long_prefill += self._prefill.plan_prefill(meta.block_tables[b:b + 1], starts[b:b + 2], lens[b:b + 1],
                                                       block_size)
        plan = _CpuStepPlan(bool((meta.slot_mapping < 0).any()), row_seq, row_lens, long_prefill)
        meta.backend_plan = plan
        return plan

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if not self._takes(q, k_cache) or meta.num_seqs == 0:
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        plan = self.plan_rows(meta, k_cache.shape[1], q.shape[0], k_cache.dtype)
        self._store_kv(k, v, k_cache, v_cache, meta.slot_mapping, has_padding=plan.has_padding)
        out = torch.empty_like(q)
        self._native.paged_attention_rows_cpu(q, k_cache, v_cache, meta.block_tables, plan.row_seq, plan.row_lens,
                                              scale, out=out)
        if plan.long_prefill:
            self._prefill.paged_prefill_attention_planned(q, k_cache, v_cache, plan.long_prefill, scale, out=out,
                                                          new_k=k, new_v=v)
        return out


class TritonAttentionBackend(PagedAttentionBackend):
    """Triton kernels: the GPU path. Tensors must live on a Triton device (or on CPU under
    ``TRITON_INTERPRET=1``, which is how the tests run it)."""

    name: ClassVar[str] = "triton"

    def __init__(self) -> None:
        if importlib.util.find_spec("triton") is None:
            raise ImportError("the 'triton' attention backend needs the triton package (pip install triton)")
        from kvloom.kernels.paged_decode_attention import paged_decode_attention
        from kvloom.kernels.paged_prefill_attention import paged_prefill_attention
        from kvloom.kernels.store_kv import store_kv

        super().__init__(store_kv, paged_decode_attention, paged_prefill_attention)


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    TorchAttentionBackend.name: TorchAttentionBackend,
    CpuAttentionBackend.name: CpuAttentionBackend,
    TritonAttentionBackend.name: TritonAttentionBackend,
}


def get_attention_backend(name: str = "auto", device: torch.device | str = "cpu") -> AttentionBackend:
    """Build the attention backend ``name`` ("auto", "torch", "cpu" or "triton") for tensors on ``device``;
    its ``reason`` says why it runs.

    "auto" is "triton" on CUDA devices when triton is installed; on CPU it is "cpu" (the C decode
    kernel, compiled for this CPU on first use) where that builds, else "torch", with a warning that
    names the cause (no C compiler, a compile error). An explicit "cpu" that cannot be built raises
    ``NativeBuildError``. Raises ``ValueError`` naming the choices for an unknown ``name``.
    """
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            return _named(TritonAttentionBackend(), "auto: a CUDA device, and triton is installed")
        if device.type == "cpu":
            from kvloom.kernels.native import NativeBuildError

            try:
                return _named(CpuAttentionBackend(), "auto: the C decode kernel built for this CPU")
            except NativeBuildError as exc:
                logger.warning("kvloom: attention falls back to torch: the C decode kernel cannot be built here: %s", exc)
                return _named(TorchAttentionBackend(), f"auto: the C decode kernel cannot be built here ({exc})")
        return _named(TorchAttentionBackend(), f"auto: no kernels for {device.type} (torch ops)")
    factory = _BACKENDS.get(name)
    if factory is None:
        choices = ", ".join(["auto", *_BACKENDS])
        raise ValueError(f"unknown attention backend {name!r}; choose one of: {choices}")
    if name == CpuAttentionBackend.name and device.type != "cpu":
        raise ValueError(f"the 'cpu' attention backend runs on CPU tensors, not on {device.type}")
    return _named(factory(), "chosen by name")


def _named(backend: AttentionBackend, reason: str) -> AttentionBackend:
    backend.reason = reason
    return backend

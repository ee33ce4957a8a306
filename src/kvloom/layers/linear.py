"""Plain linear and embedding layers with uninitialised parameters.

Parameters are allocated with ``torch.empty`` in the model dtype on the default device (the
loader constructs the model under ``with torch.device(...)``), so building a model costs
no random init and no dtype conversion; the checkpoint fills every parameter.

A ``Linear`` can be given a ``LinearDelta`` (``delta``): a hook that adds to the GEMM's output,
e.g. per-token LoRA adapters (``kvloom.lora`` attaches its slot stacks to the projections built
with ``lora_names``, the HF projections they hold, e.g. q/k/v). Without one, the forward is the
plain GEMM, with one attribute check more. This module knows nothing of LoRA beyond those names:
``kvloom.lora`` imports ``kvloom.layers``, never the reverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.layers.row_buckets import padded_rows

if TYPE_CHECKING:
    from kvloom.layers.int8_weights import Int8Plan, Int8Weights


class LinearDelta(Protocol):
    """Something added to a ``Linear``'s output (e.g. LoRA adapters), attached as ``Linear.delta``."""

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x ``[T, in_features]``; out ``[T, out_features]``, the layer's GEMM of ``x``.

        Returns the layer's output: ``out`` plus the delta (in place or not), or ``out`` itself
        when there is nothing to add for this step.
        """
        ...


class Linear(nn.Module):
    """``y = x @ weight.T + bias``; ``weight [out_features, in_features]``, ``bias [out_features]``.

    ``lora_names``: the HF projection(s) this layer holds (one per shard), empty when LoRA never
    applies to it (e.g. the LM head).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None = None,
        lora_names: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.lora_names = tuple(lora_names)
        # Added to the output when set (``kvloom.lora.slots.LoRASlots`` attaches its stacks here).
        self.delta: LinearDelta | None = None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )
        self.onednn_packed = False
        """Whether ``weight`` is a oneDNN-packed copy (``pack_onednn``) rather than a dense parameter."""
        self.int8: Int8Weights | None = None
        """The int8 weights (``quantize_int8``); then ``weight`` is their int8 buffer and ``bias`` is None."""

    @property
    def compute_dtype(self) -> torch.dtype:
        """The float dtype of this layer's inputs and outputs (``weight.dtype`` unless quantized)."""
        return self.int8.dtype if self.int8 is not None else self.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[T, in_features]`` -> ``[T, out_features]`` (+ the ``delta``, if any)."""
        if self.int8 is not None:
            out = self.int8.matmul(x)
        elif self.onednn_packed:
            out = self._packed_gemm(x)
        else:
            out = F.linear(x, self.weight, self.bias)
        delta = self.delta
        if delta is None:
            return out
        return delta.apply(x, out)

    def _packed_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """oneDNN's GEMM on the packed weight at a bucketed row count (``row_buckets``): ``x`` is
        padded with zero rows, and the extra output rows are dropped (a contiguous view)."""
        rows = x.shape[0]
        padded = padded_rows(rows)
        if padded != rows:
            x = F.pad(x, (0, 0, 0, padded - rows))
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return out[:rows] if padded != rows else out

    @property
    def lora_output_sizes(self) -> tuple[int, ...]:
        """Output size of each shard named in ``lora_names``."""
        return (self.out_features,)

    @torch.no_grad()
    def pack_onednn(self) -> None:
        """Swap the dense weight for a copy packed in oneDNN's blocked layout (CPU; idempotent).

        The packed copy is a buffer named ``weight`` with the same shape, dtype and device, so
        LoRA slots and logs still read them; its values can only be read back through
        ``weight.to_dense()``, so code that would use it as a dense matrix fails instead of
        computing garbage. Load weights before packing: a packed layer takes no more. The dense
        copy is freed (peak extra memory: one weight).
        """
        if self.onednn_packed:
            return
        packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        del self.weight
        self.register_buffer("weight", packed)
        self.onednn_packed = True

    @torch.no_grad()
    def quantize_int8(self, kernels: ModuleType, plan: Int8Plan | None = None) -> None:
        """Replace the dense float weight by int8 weights per output channel (``layers.int8_weights``;
        ``kernels`` is ``kvloom.kernels.int8_linear_cpu``, loaded). ``weight`` becomes the packed int8
        buffer (the kernel's 4-D layout, so code that would use it as a dense matrix fails instead of
        computing garbage; ``compute_dtype`` is the float dtype), the bias moves into the int8
        weights; ``plan`` (default: ``int8_weights.plan_for`` the dtype) says which kernel takes which
        row counts. Load and lay out nothing after this (idempotent)."""
        from kvloom.layers.int8_weights import Int8Weights

        if self.int8 is not None:
            return
        if self.onednn_packed:
            raise ValueError("quantize_int8 on a oneDNN-packed weight: quantize the dense weight instead")
        self.int8 = Int8Weights.quantize(self.weight, self.bias, kernels, plan)
        del self.weight
        self.register_buffer("weight", self.int8.packed)
        self.bias = None


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim (one GEMM).

    Shard ``i`` (e.g. q, k, v or gate, up) owns output rows
    ``[shard_offsets[i], shard_offsets[i] + output_sizes[i])`` of ``weight`` and ``bias``.
    """

    def __init__(
        self, in_features: int, output_sizes: Sequence[int], bias: bool, dtype: torch.dtype | None = None,
        lora_names: Sequence[str] = (),
    ) -> None:
        super().__init__(in_features, sum(output_sizes), bias, dtype, lora_names)
        if lora_names and len(lora_names) != len(output_sizes):
            raise ValueError(f"lora_names {tuple(lora_names)} must name each of {len(output_sizes)} shards")
        self.output_sizes = tuple(output_sizes)
        offsets = [0]
        for size in self.output_sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.shard_offsets = tuple(offsets)

    @property
    def lora_output_sizes(self) -> tuple[int, ...]:
        return self.output_sizes

    def shard_rows(self, index: int) -> slice:
        """Rows of ``weight``/``bias`` that hold shard ``index``."""
        start = self.shard_offsets[index]
        return slice(start, start + self.output_sizes[index])


class Embedding(nn.Module):
    """Token lookup; ``weight [num_embeddings, embedding_dim]``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_embeddings, embedding_dim, dtype=dtype), requires_grad=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids ``[T]`` int64 -> ``[T, embedding_dim]``."""
        return F.embedding(input_ids, self.weight)

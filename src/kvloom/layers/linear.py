"""Plain linear and embedding layers with uninitialised parameters.

Parameters are allocated with ``torch.empty`` in the model dtype on the default device (the
loader constructs the model under ``with torch.device(...)``), so building a model costs
no random init and no dtype conversion; the checkpoint fills every parameter.

LoRA: a projection built with ``lora_names`` (the HF projections it holds, e.g. q/k/v) can be
given slot-stacked adapter weights (``lora``, attached by ``kvloom.lora.slots.LoRASlots``).
Its forward adds the adapters' delta only while the shared context holds a step mapping;
otherwise it is the plain GEMM, with one attribute check more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.lora.context import LoRAStack
from kvloom.lora.ops import add_lora


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
        # Slot-stacked adapter weights: None until ``LoRASlots`` attaches them.
        self.lora: LoRAStack | None = None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[T, in_features]`` -> ``[T, out_features]`` (+ each token's adapter delta, if any)."""
        out = F.linear(x, self.weight, self.bias)
        lora = self.lora
        if lora is None or lora.context.mapping is None:
            return out
        return add_lora(x, out, lora, lora.context.mapping)

    @property
    def lora_output_sizes(self) -> tuple[int, ...]:
        """Output size of each shard named in ``lora_names``."""
        return (self.out_features,)


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

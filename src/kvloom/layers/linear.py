"""Plain linear and embedding layers with uninitialised parameters.

Parameters are allocated with ``torch.empty`` in the model dtype on the default device (the
loader constructs the model under ``with torch.device(...)``), so building a model costs
no random init and no dtype conversion; the checkpoint fills every parameter. LoRA will wrap
these layers (their ``forward`` is the single place a delta would be added).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """``y = x @ weight.T + bias``; ``weight [out_features, in_features]``, ``bias [out_features]``."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[T, in_features]`` -> ``[T, out_features]``."""
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim (one GEMM).

    Shard ``i`` (e.g. q, k, v or gate, up) owns output rows
    ``[shard_offsets[i], shard_offsets[i] + output_sizes[i])`` of ``weight`` and ``bias``.
    """

    def __init__(
        self, in_features: int, output_sizes: Sequence[int], bias: bool, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(in_features, sum(output_sizes), bias, dtype)
        self.output_sizes = tuple(output_sizes)
        offsets = [0]
        for size in self.output_sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.shard_offsets = tuple(offsets)

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

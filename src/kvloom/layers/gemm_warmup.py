"""Warm-up of oneDNN-packed linears: every row-count bucket of every distinct layer shape, run once.

oneDNN compiles a kernel the first time it meets a (weight shape, row count) pair and keeps it. With
row counts bounded (``row_buckets``), running each bucket once at start means no kernel is ever
compiled on the request path, and the memory those kernels take is all there before the first
request (the growth a long-running server would otherwise see as rare step sizes first appear).
Layers of equal shape share kernels, so one layer of each shape is enough.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvloom.layers.linear import Linear
from kvloom.layers.row_buckets import buckets_up_to


@torch.no_grad()
def warm_up_packed_linears(layers: Iterable[tuple[Linear, int]]) -> int:
    """Run each packed layer shape of ``layers`` (layer, most rows it will see) once at every bucket
    up to that many rows, on zeros. Layers that are not packed are skipped. Returns the number of
    GEMMs run. Call it before any adapter attaches a delta (it runs the plain GEMM)."""
    done: set[tuple[int, int, torch.dtype, bool]] = set()
    count = 0
    for layer, max_rows in layers:
        key = (layer.in_features, layer.out_features, layer.weight.dtype, layer.bias is not None)
        if not layer.onednn_packed or key in done:
            continue
        done.add(key)
        for rows in buckets_up_to(max_rows):
            layer(torch.zeros(rows, layer.in_features, dtype=layer.weight.dtype, device=layer.weight.device))
            count += 1
    return count

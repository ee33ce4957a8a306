"""Random grouped-LoRA problems for the shrink/expand kernel tests, and a float64 per-token oracle."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvloom.lora.mapping import LoRAMapping


@dataclass
class LoRACase:
    """Slot-stacked weights, inputs and routing. Slots no token uses hold NaN weights, so an op
    that reads an inactive slot fails loudly; slot ``s`` has rank ``ranks[s]`` (zero-padded to R)."""

    x: torch.Tensor
    """``[T, in]``."""
    a: torch.Tensor
    """``[S, n_slices, R, in]``."""
    b: torch.Tensor
    """``[S, sum(output_sizes), R]``."""
    output_sizes: tuple[int, ...]
    token_slots: list[int]
    mapping: LoRAMapping

    def args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.mapping
        return m.token_ids, m.seg_starts, m.seg_lens, m.seg_slots


def token_mapping(token_slots: Sequence[int]) -> LoRAMapping:
    """The mapping of a step whose ``t``-th token uses slot ``token_slots[t]`` (-1: none): one token per request."""
    return LoRAMapping.from_request_slots(list(token_slots), [1] * len(token_slots))


def make_case(token_slots: Sequence[int], num_slots: int, in_features: int, output_sizes: Sequence[int],
              max_rank: int, ranks: Sequence[int], dtype: torch.dtype = torch.float32, seed: int = 0) -> LoRACase:
    gen = torch.Generator().manual_seed(seed)
    n_slices, total_out = len(output_sizes), sum(output_sizes)
    x = torch.randn(len(token_slots), in_features, generator=gen)
    a = torch.randn(num_slots, n_slices, max_rank, in_features, generator=gen) / in_features**0.5
    b = torch.randn(num_slots, total_out, max_rank, generator=gen)
    for slot, rank in enumerate(ranks):
        a[slot, :, rank:] = 0
        b[slot, :, rank:] = 0
    for slot in set(range(num_slots)) - set(token_slots):
        a[slot], b[slot] = float("nan"), float("nan")
    mapping = token_mapping(token_slots)
    return LoRACase(x.to(dtype), a.to(dtype), b.to(dtype), tuple(output_sizes), list(token_slots), mapping)


def oracle_delta(case: LoRACase) -> torch.Tensor:
    """float64 ``[T, sum(output_sizes)]``: each adapter token's delta, token by token (0 for no adapter)."""
    delta = torch.zeros(case.x.shape[0], sum(case.output_sizes), dtype=torch.float64)
    for t, slot in enumerate(case.token_slots):
        if slot < 0:
            continue
        col = 0
        for i, size in enumerate(case.output_sizes):
            shrunk = case.a[slot, i].double() @ case.x[t].double()
            delta[t, col:col + size] = case.b[slot, col:col + size].double() @ shrunk
            col += size
    return delta


def oracle_shrink(case: LoRACase) -> torch.Tensor:
    """float64 ``[num_lora_tokens, n_slices, R]`` in the mapping's grouped row order."""
    rows = [case.a[case.token_slots[t]].double() @ case.x[t].double() for t in case.mapping.token_ids.tolist()]
    return torch.stack(rows) if rows else torch.zeros(0, *case.a.shape[1:3], dtype=torch.float64)


def shuffled_slots(num_tokens: int, num_slots: int, no_adapter_every: int, seed: int) -> list[int]:
    """Every slot used at least once, every ``no_adapter_every``-th token without an adapter, in shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    slots = [t % num_slots for t in range(num_tokens)]
    slots = [-1 if t % no_adapter_every == 0 else s for t, s in enumerate(slots)]
    order = torch.randperm(num_tokens, generator=gen).tolist()
    return [slots[i] for i in order]

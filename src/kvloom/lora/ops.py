"""Grouped LoRA shrink/expand over a step's flattened batch: Triton on CUDA, the torch references elsewhere."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvloom.kernels.lora_expand import lora_expand as _expand_triton
from kvloom.kernels.lora_expand import lora_expand_ref
from kvloom.kernels.lora_shrink import lora_shrink as _shrink_triton
from kvloom.kernels.lora_shrink import lora_shrink_ref
from kvloom.lora.mapping import LoRAMapping

if TYPE_CHECKING:
    from kvloom.lora.context import LoRAStack


def lora_shrink(x: torch.Tensor, a: torch.Tensor, mapping: LoRAMapping) -> torch.Tensor:
    """x ``[T, in]``, a ``[S, n_slices, R, in]`` -> y ``[num_lora_tokens, n_slices, R]`` float32, grouped rows."""
    shrink = _shrink_triton if x.is_cuda else lora_shrink_ref
    y: torch.Tensor = shrink(x, a, mapping.token_ids, mapping.seg_starts, mapping.seg_lens, mapping.seg_slots,
                             mapping.max_seg_len)
    return y


def lora_expand(y: torch.Tensor, b: torch.Tensor, output_sizes: tuple[int, ...], mapping: LoRAMapping,
                out: torch.Tensor) -> None:
    """``out[t, slice i] += y[row of t, i] @ b[slot of t, slice i].T`` for adapter tokens; in place."""
    expand = _expand_triton if out.is_cuda else lora_expand_ref
    expand(y, b, out, mapping.token_ids, mapping.seg_starts, mapping.seg_lens, mapping.seg_slots,
           output_sizes, mapping.max_seg_len)


def add_lora(x: torch.Tensor, out: torch.Tensor, stack: LoRAStack, mapping: LoRAMapping) -> torch.Tensor:
    """``out += B_slot (A_slot x)`` per token (scale already in B); returns ``out``.

    x ``[T, in]``; out ``[T, sum(stack.output_sizes)]``, the base projection of ``x``.
    Raises ``ValueError`` when the mapping was built for a step of another size.
    """
    if x.shape[0] != mapping.num_tokens:
        raise ValueError(f"the LoRA mapping routes {mapping.num_tokens} tokens, the forward has {x.shape[0]}")
    lora_expand(lora_shrink(x, stack.a, mapping), stack.b, stack.output_sizes, mapping, out)
    return out

"""What a LoRA-able layer holds: its slot-stacked weights and the model's shared per-step routing.

``LoRAStack`` is the ``kvloom.layers.linear.LinearDelta`` that ``LoRASlots`` attaches to each
LoRA-able projection (``Linear.delta``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvloom.lora.mapping import LoRAMapping
from kvloom.lora.ops import add_lora


@dataclass(slots=True)
class LoRAContext:
    """One per model, shared by all of its LoRA layers; the runner sets ``mapping`` before each forward.

    ``mapping`` is None for a step where no token uses an adapter: the layers then run exactly
    their base path.
    """

    mapping: LoRAMapping | None = None


@dataclass(frozen=True, slots=True, eq=False)
class LoRAStack:
    """One LoRA-able (possibly fused) projection's weights for every slot, on the layer's device.

    Invariants: zero wherever a slot holds no adapter, a projection its adapter doesn't target,
    or a rank below ``R`` (zero A rows / B columns add nothing). B holds the adapter's scale.
    """

    a: torch.Tensor
    """``[max_loras, n_slices, R, in_features]`` in the model dtype."""
    b: torch.Tensor
    """``[max_loras, sum(output_sizes), R]``: slice ``i``'s rows sit where its shard sits in the fused weight."""
    output_sizes: tuple[int, ...]
    """Output size of each slice (e.g. q, k, v)."""
    hf_names: tuple[str, ...]
    """The HF projection of each slice (e.g. ``q_proj``, ``k_proj``, ``v_proj``)."""
    context: LoRAContext

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus each token's adapter delta under the context's mapping (``LinearDelta``).

        Returns ``out`` untouched, running no LoRA op, while the context holds no mapping.
        """
        mapping = self.context.mapping
        if mapping is None:
            return out
        return add_lora(x, out, self, mapping)

"""Which LoRA slot each token of a step uses, in the grouped form the shrink/expand ops want.

Built once per step on the host (from each request's slot and token count) and shared by
every LoRA layer of the forward. Tokens are grouped by slot: adapter tokens, stably sorted
by slot, form ``num_segments`` contiguous segments, one per slot that has tokens this step.
No-adapter tokens (slot -1) belong to no segment; the ops never touch their rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True, eq=False)
class LoRAMapping:
    """A step's token -> slot routing. Build with ``from_request_slots``.

    Invariants: segment ``s`` is grouped rows ``[seg_starts[s], seg_starts[s] + seg_lens[s])``;
    its tokens (``token_ids`` at those rows, ascending) all use slot ``seg_slots[s]``; segments
    are in increasing slot order, each ``seg_lens[s] >= 1``, slots distinct; the rows cover
    ``0 .. num_lora_tokens - 1``. Device tensors live on the model's device; ``*_cpu`` are their
    host copies, so the CPU path and launch grids never read the device.
    """

    num_tokens: int
    """``T``: tokens in the step, with or without an adapter."""
    token_ids: torch.Tensor
    """``[num_lora_tokens]`` int64: the adapter tokens' indices into the step's ``[T]`` rows, grouped by slot."""
    seg_starts: torch.Tensor
    """``[num_segments]`` int32: first grouped row of each segment."""
    seg_lens: torch.Tensor
    """``[num_segments]`` int32: tokens in each segment."""
    seg_slots: torch.Tensor
    """``[num_segments]`` int32: the slot of each segment."""
    seg_starts_cpu: tuple[int, ...]
    seg_lens_cpu: tuple[int, ...]
    seg_slots_cpu: tuple[int, ...]

    @property
    def num_segments(self) -> int:
        return len(self.seg_slots_cpu)

    @property
    def max_seg_len(self) -> int:
        """Longest segment (0 when no token uses an adapter); sizes the kernels' grid."""
        return max(self.seg_lens_cpu, default=0)

    @property
    def has_lora(self) -> bool:
        """Does any token use an adapter? When not, a forward should do no LoRA work."""
        return bool(self.seg_slots_cpu)

    @classmethod
    def from_request_slots(cls, request_slots: Sequence[int], query_lens: Sequence[int],
                           device: torch.device | str = "cpu") -> LoRAMapping:
        """From each request's slot (``-1``: base model) and its token count this step.

        Requests own consecutive token rows in the given order, as in the runner's flattened batch.
        """
        if len(request_slots) != len(query_lens):
            raise ValueError(f"{len(request_slots)} request slots for {len(query_lens)} query lengths")
        starts, num_tokens = [], 0
        for query_len in query_lens:
            starts.append(num_tokens)
            num_tokens += query_len
        by_slot: dict[int, list[int]] = {}
        for slot, start, query_len in zip(request_slots, starts, query_lens, strict=True):
            if slot >= 0 and query_len > 0:
                by_slot.setdefault(slot, []).extend(range(start, start + query_len))
        seg_slots = sorted(by_slot)
        seg_lens = [len(by_slot[s]) for s in seg_slots]
        seg_starts = [sum(seg_lens[:i]) for i in range(len(seg_lens))]
        token_ids = torch.tensor([t for s in seg_slots for t in by_slot[s]], dtype=torch.int64)
        return cls._build(num_tokens, token_ids, seg_starts, seg_lens, seg_slots, torch.device(device))

    @classmethod
    def _build(cls, num_tokens: int, token_ids: torch.Tensor, seg_starts: list[int], seg_lens: list[int],
               seg_slots: list[int], device: torch.device) -> LoRAMapping:
        segs = torch.tensor([seg_starts, seg_lens, seg_slots], dtype=torch.int32).reshape(3, -1)
        if device.type != "cpu":  # two host-to-device copies per step, whatever the number of layers
            token_ids, segs = token_ids.to(device, non_blocking=True), segs.to(device, non_blocking=True)
        return cls(num_tokens=num_tokens, token_ids=token_ids, seg_starts=segs[0], seg_lens=segs[1],
                   seg_slots=segs[2], seg_starts_cpu=tuple(seg_starts), seg_lens_cpu=tuple(seg_lens),
                   seg_slots_cpu=tuple(seg_slots))

"""Device-resident LoRA slots: ``max_loras`` adapters' weights stacked for every LoRA-able projection.

``LoRASlots(model, ...)`` allocates, once, zeroed ``[max_loras, ...]`` A/B stacks for every
projection built with ``lora_names`` (see ``kvloom.layers.linear``) and attaches them to those
layers together with one shared ``LoRAContext``. Per step, the engine thread calls
``activate`` with the adapters the step needs (which copies any that are not resident into a
slot, evicting the least recently used unpinned one), builds a ``LoRAMapping`` from the
returned slots, and hands it to ``set_mapping`` before the forward.

Slots are keyed by a caller-chosen name and remember the content hash they hold, so
activating a name with new weights (a reload) refreshes its slot. Key by
``adapter.content_hash`` where two versions of one adapter name may share a step.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import nn

from kvloom.errors import AdapterError
from kvloom.layers.linear import Linear
from kvloom.lora.adapter import LoRAAdapter, projection_shape
from kvloom.lora.context import LoRAContext, LoRAStack
from kvloom.lora.mapping import LoRAMapping
from kvloom.lora.peft_config import LORA_MODULES
from kvloom.models.config import ModelConfig

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def slot_bytes(config: ModelConfig, max_loras: int, max_lora_rank: int, dtype: torch.dtype) -> int:
    """Device memory ``LoRASlots`` allocates for a model with ``config`` (to budget the KV cache)."""
    per_layer = sum(in_f + out_f for in_f, out_f in (projection_shape(config, m) for m in LORA_MODULES))
    element_size = torch.empty((), dtype=dtype).element_size()
    return config.num_layers * per_layer * max_loras * max_lora_rank * element_size


class LoRASlots:
    """``max_loras`` adapter slots of rank ``max_lora_rank`` on the model's device, filled LRU.

    Engine-thread only. Invariants: a name is in at most one slot; a pinned name is always
    resident and never evicted; ``activate`` never evicts a name the same call needs.
    """

    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int) -> None:
        if max_loras < 1 or max_lora_rank < 1:
            raise ValueError(f"max_loras ({max_loras}) and max_lora_rank ({max_lora_rank}) must be >= 1")
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.context = LoRAContext()
        self.stacks: dict[int, list[LoRAStack]] = {}
        """Layer index -> the stacks of its LoRA-able projections."""
        self._layers: list[Linear] = []
        for name, module in model.named_modules():
            if not (isinstance(module, Linear) and module.lora_names):
                continue
            match = _LAYER.search(f".{name}.")
            if match is None:
                raise ValueError(f"LoRA-able module '{name}' is not inside a numbered decoder layer")
            if module.delta is not None:
                raise ValueError(f"module '{name}' already has LoRA slots attached")
            weight, dtype = module.weight, module.compute_dtype
            sizes = module.lora_output_sizes
            # Normal tensors even when built under inference_mode (the runner's step): inference
            # tensors could not be written by a later load outside it.
            with torch.inference_mode(False):
                a = torch.zeros(max_loras, len(sizes), max_lora_rank, module.in_features,
                                dtype=dtype, device=weight.device)
                b = torch.zeros(max_loras, sum(sizes), max_lora_rank, dtype=dtype, device=weight.device)
            stack = LoRAStack(a=a, b=b, output_sizes=sizes, hf_names=module.lora_names, context=self.context)
            self.stacks.setdefault(int(match.group(1)), []).append(stack)
            module.delta = stack
            self._layers.append(module)
        if not self._layers:
            raise ValueError(f"{type(model).__name__} has no LoRA-able projections")
        self._slot_names: list[str | None] = [None] * max_loras
        self._slot_hashes: list[str | None] = [None] * max_loras
        self._name_to_slot: dict[str, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict((slot, None) for slot in range(max_loras))
        """Slots, least recently used first."""
        self._pinned: dict[str, LoRAAdapter] = {}
        self.num_loads = 0
        """Adapters copied into a slot so far (a measure of slot thrashing)."""

    @property
    def resident(self) -> set[str]:
        """The names now in a slot."""
        return set(self._name_to_slot)

    def slot_of(self, name: str) -> int | None:
        """The slot holding ``name``, if resident."""
        return self._name_to_slot.get(name)

    def set_mapping(self, mapping: LoRAMapping | None) -> None:
        """Route the next forwards' tokens; None (or a mapping without adapter tokens): base model only."""
        if mapping is not None and not all(0 <= s < self.max_loras for s in mapping.seg_slots_cpu):
            raise ValueError(f"mapping uses slots {mapping.seg_slots_cpu}, outside 0..{self.max_loras - 1}")
        self.context.mapping = mapping if mapping is not None and mapping.has_lora else None

    def activate(self, names: Sequence[str], adapters: Mapping[str, LoRAAdapter]) -> dict[str, int]:
        """Make ``names`` resident (their adapters from ``adapters``, else the pinned ones); name -> slot.

        Copies each adapter that is not resident (or whose content hash changed) from host memory
        into a free slot, else the least recently used slot that is not needed here. Pinned
        adapters keep their slots whenever they fit beside ``names``; when they don't (an adapter
        that was already running when the pins changed), a pinned one not needed by this step
        may give up its slot until the pins fit again, when it is loaded back. Raises
        ``ValueError`` when ``names`` alone exceed ``max_loras`` or a name has no adapter.
        """
        needed = list(dict.fromkeys(names))
        if len(needed) > self.max_loras:
            raise ValueError(f"{len(needed)} adapters in one step exceed max_loras={self.max_loras}")
        pins_fit = len(set(needed) | set(self._pinned)) <= self.max_loras
        protected = set(needed) | (set(self._pinned) if pins_fit else set())
        slots: dict[str, int] = {}
        for name in needed:
            adapter = adapters.get(name, self._pinned.get(name))
            if adapter is None:
                raise ValueError(f"no adapter given for {name!r}")
            if name in self._pinned:
                self._pinned[name] = adapter
            slots[name] = self._ensure(name, adapter, protected=protected)
        if pins_fit:
            for name, adapter in self._pinned.items():
                if name not in slots:
                    self._ensure(name, adapter, protected=protected)
        return slots

    def set_pinned(self, adapters: Mapping[str, LoRAAdapter], in_use: Collection[str] = ()) -> None:
        """Replace the pinned set with ``adapters`` (name -> adapter) and load those that find a
        slot now; never evicts ``in_use`` (adapters of requests already running), so a pinned
        adapter that finds no slot is loaded by a later ``activate``, once those have ended."""
        if len(adapters) > self.max_loras:
            raise ValueError(f"{len(adapters)} pinned adapters exceed max_loras={self.max_loras}")
        self._pinned = dict(adapters)
        protected = set(adapters) | set(in_use)
        for name, adapter in adapters.items():
            if name in self._name_to_slot or self._has_room(protected):
                self._ensure(name, adapter, protected=protected)

    def _has_room(self, protected: set[str]) -> bool:
        return any(n is None or n not in protected for n in self._slot_names)

    def _ensure(self, name: str, adapter: LoRAAdapter, protected: set[str]) -> int:
        slot = self._name_to_slot.get(name)
        if slot is None:
            slot = next(s for s in self._lru if self._slot_names[s] is None or self._slot_names[s] not in protected)
            evicted = self._slot_names[slot]
            if evicted is not None:
                del self._name_to_slot[evicted]
            self._slot_names[slot] = None
        if self._slot_hashes[slot] != adapter.content_hash:
            # Empty the slot first: a failed write must not leave a half-written slot under a name.
            self._name_to_slot.pop(name, None)
            self._slot_names[slot] = self._slot_hashes[slot] = None
            self._write(slot, adapter)
            self.num_loads += 1
        self._slot_names[slot], self._slot_hashes[slot] = name, adapter.content_hash
        self._name_to_slot[name] = slot
        self._lru.move_to_end(slot)
        return slot

    @torch.no_grad()
    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy ``adapter`` into ``slot`` of every stack; zero wherever it has no weights."""
        if adapter.rank > self.max_lora_rank:
            raise AdapterError(f"{adapter.path}: rank {adapter.rank} exceeds max_lora_rank={self.max_lora_rank}")
        unknown = [key for key in adapter.weights if key[0] not in self.stacks]
        if unknown:
            raise AdapterError(f"{adapter.path}: layer {unknown[0][0]} does not exist in this model")
        for layer, stacks in self.stacks.items():
            for stack in stacks:
                stack.a[slot].zero_()
                stack.b[slot].zero_()
                row = 0
                for index, (hf_name, size) in enumerate(zip(stack.hf_names, stack.output_sizes, strict=True)):
                    pair = adapter.weights.get((layer, hf_name))
                    if pair is not None:
                        a, b = pair
                        rank = a.shape[0]
                        if a.shape[1] != stack.a.shape[3] or b.shape[0] != size:
                            raise AdapterError(f"{adapter.path}: layer {layer} {hf_name} weights "
                                               f"{tuple(a.shape)}/{tuple(b.shape)} do not fit this model")
                        stack.a[slot, index, :rank].copy_(a)
                        stack.b[slot, row:row + size, :rank].copy_(b)
                    row += size

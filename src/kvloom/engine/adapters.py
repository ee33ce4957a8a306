"""The frontend's LoRA adapter registry: names -> loaded adapters (event-loop side).

Reading and preparing an adapter (file I/O, safetensors parsing, shape checks, hashing)
happens off the event loop and off the engine step; the engine thread only copies prepared
host tensors into a device slot when a step first needs the adapter. Requests capture the
adapter *object*: unloading or reloading a name never changes a request already submitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvloom.errors import InvalidRequestError

if TYPE_CHECKING:
    from kvloom.lora.adapter import LoRAAdapter
    from kvloom.models.config import ModelConfig


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """What ``engine.adapters()`` lists."""

    name: str
    path: Path
    rank: int
    pinned: bool
    content_hash: str


class AdapterRegistry:
    """Name -> adapter. Not thread-safe: use from one thread (the event loop, or ``LLM``'s caller)."""

    def __init__(self, model_config: ModelConfig, max_lora_rank: int, max_loras: int) -> None:
        self.model_config = model_config
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self._adapters: dict[str, tuple[LoRAAdapter, bool]] = {}

    def read(self, path: str | Path) -> LoRAAdapter:
        """Load and check a PEFT directory (slow: call it off the event loop)."""
        from kvloom.lora.adapter import load_peft_adapter

        return load_peft_adapter(Path(path), self.model_config, self.max_lora_rank)

    def add(self, name: str, adapter: LoRAAdapter, pinned: bool) -> AdapterInfo:
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("name: an adapter name must be a non-empty string")
        if pinned:
            others = [n for n, (_, p) in self._adapters.items() if p and n != name]
            if len(others) >= self.max_loras:
                raise InvalidRequestError(
                    f"pinned: {len(others)} adapters are pinned already, and max_loras is {self.max_loras}"
                )
        self._adapters[name] = (adapter, pinned)
        return self._info(name)

    def remove(self, name: str) -> None:
        if self._adapters.pop(name, None) is None:
            raise InvalidRequestError(f"name: no adapter named {name!r} is loaded")

    def resolve(self, name: str | None) -> LoRAAdapter | None:
        """The adapter a request named (None: the base model); unknown names are refused."""
        if name is None:
            return None
        entry = self._adapters.get(name)
        if entry is None:
            known = ", ".join(sorted(self._adapters)) or "none"
            raise InvalidRequestError(f"adapter: no adapter named {name!r} is loaded (loaded: {known})")
        return entry[0]

    def resolve_for_request(self, name: str | None) -> LoRAAdapter | None:
        """Like ``resolve``, and refuses an adapter that could never get a slot: one not pinned
        while all ``max_loras`` slots are pinned to others (fail now rather than wait forever)."""
        adapter = self.resolve(name)
        if adapter is None or self._adapters[name][1]:  # type: ignore[index]
            return adapter
        pinned = sorted(n for n, (_, p) in self._adapters.items() if p)
        if len(pinned) >= self.max_loras:
            raise InvalidRequestError(
                f"adapter: all max_loras={self.max_loras} adapter slots are pinned ({', '.join(pinned)}), so "
                f"{name!r} could never run; unpin one (load_adapter(..., pinned=False)) or raise max_loras")
        return adapter

    def pinned(self) -> list[LoRAAdapter]:
        return [adapter for adapter, pinned in self._adapters.values() if pinned]

    def infos(self) -> list[AdapterInfo]:
        return [self._info(name) for name in sorted(self._adapters)]

    def _info(self, name: str) -> AdapterInfo:
        adapter, pinned = self._adapters[name]
        return AdapterInfo(name, Path(adapter.path), adapter.rank, pinned, adapter.content_hash)

"""Chain hashes of full KV blocks: ``h_i = H(h_{i-1}, tokens_i, extra_keys)``.

A block's hash names its whole prefix, so equal hashes mean equal prefixes (up to a
collision, which the pool rules out by also comparing tokens). Extra keys (cache salt, adapter
identity) keep caches that must not mix apart.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)


def extra_keys(cache_salt: str | None, adapter_hash: str | None = None) -> tuple[object, ...]:
    """The extra hash keys of a request: its cache salt and its LoRA adapter's content hash
    (so a name reloaded with new weights never reuses the old weights' KV)."""
    keys: tuple[object, ...] = () if cache_salt is None else (("salt", cache_salt),)
    return keys if adapter_hash is None else (*keys, ("lora", adapter_hash))


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple[object, ...] = ()) -> BlockHash:
    """SHA-256 of the parent hash, the block's token ids and the extra keys."""
    h = hashlib.sha256(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return BlockHash(h.digest())


def hash_full_blocks(
    token_ids: Sequence[int], block_size: int, start: int = 0, parent: BlockHash | None = None,
    extra_keys: tuple[object, ...] = (),
) -> list[BlockHash]:
    """Hashes of full blocks ``start, start + 1, ...`` of ``token_ids``, chained from ``parent``
    (the hash of block ``start - 1``)."""
    hashes: list[BlockHash] = []
    for i in range(start, len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], extra_keys)
        hashes.append(parent)
    return hashes

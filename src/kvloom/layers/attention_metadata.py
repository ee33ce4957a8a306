"""What every attention backend needs to know about a flattened batch.

The runner flattens a step's scheduled tokens into one ``[T]`` row of tokens from ``B``
sequences. Sequences whose query length is 1 ("decodes") come first, so the first
``num_decodes`` tokens are exactly the decode tokens; the remaining sequences are prefills
(a whole prompt, or a chunk of one that continues from tokens already in the cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step attention inputs. Built once per step by the runner, shared by all layers.

    Invariants: ``query_start_loc[-1] == T``; for every sequence ``b``,
    ``1 <= query_len(b) <= seq_lens[b]`` and its ``ceil(seq_lens[b] / block_size)`` first
    ``block_tables[b]`` entries are valid block ids. The new tokens' K/V are written into
    ``slot_mapping`` before attention reads the cache, so attention reads every key of a
    sequence, old and new, from the paged cache.
    """

    num_decodes: int
    """The first ``num_decodes`` sequences have query length 1 (and are the first tokens)."""
    slot_mapping: torch.Tensor
    """``[T]`` int64: flat slot ``block_id * block_size + offset`` for each token's K/V; -1 skips."""
    query_start_loc: torch.Tensor
    """``[B + 1]`` int32: cumulative query lengths; sequence b owns rows ``[qsl[b], qsl[b+1])``."""
    seq_lens: torch.Tensor
    """``[B]`` int32: context length of each sequence after this step (cached + new tokens)."""
    block_tables: torch.Tensor
    """``[B, max_num_blocks]`` int32: each sequence's block ids; unused entries are 0 and never read."""
    max_query_len: int
    """Largest query length in the batch."""
    max_seq_len: int
    """Largest ``seq_lens`` entry."""
    query_start_loc_cpu: list[int]
    """Host copy of ``query_start_loc`` so the torch path never syncs with the device."""
    seq_lens_cpu: list[int]
    """Host copy of ``seq_lens``."""
    backend_plan: Any = None
    """What a backend derives from this metadata for all layers (masks, gather indices): built by
    the first layer's call, reused by the others. Private to the backend that built it."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

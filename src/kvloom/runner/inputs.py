"""Flatten one step's scheduled tokens into model inputs and attention metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvloom.layers.attention_metadata import AttentionMetadata
from kvloom.layers.host_copy import to_device
from kvloom.runner.state import PENDING_TOKEN, CachedRequestState


@dataclass(slots=True)
class ModelInputs:
    input_ids: torch.Tensor
    """``[T]`` int64."""
    positions: torch.Tensor
    """``[T]`` int64: absolute position of each token in its sequence."""
    attn: AttentionMetadata
    req_order: list[CachedRequestState]
    """Sequences in batch order: decodes (one token) first, then prefills."""
    sample_rows: list[int]
    """Indices into ``req_order`` of the sequences that sample a token this step."""
    logits_indices: torch.Tensor
    """``[len(sample_rows)]`` int64: the row of each sampling sequence's last token."""
    pending_index: list[int]
    """Positions in ``input_ids`` holding ``PENDING_TOKEN``: a token the previous step samples, still
    on the device only (scheduling ahead). The runner fills them from that step's output."""
    pending_states: list[CachedRequestState]
    """The sequence of each ``pending_index`` entry."""


def build_inputs(
    states: list[CachedRequestState], num_scheduled: dict[str, int], block_size: int, device: torch.device
) -> ModelInputs:
    """Order sequences decodes-first and build every per-token and per-sequence tensor.

    Positions of sequence ``s`` are ``[c, c + n)`` with ``c`` its computed tokens and ``n``
    its scheduled tokens; it samples when ``c + n`` reaches its known tokens (``PENDING_TOKEN``
    placeholders included). Only the last input of a sequence may be a placeholder.
    """
    decodes = [s for s in states if num_scheduled[s.req_id] == 1]
    prefills = [s for s in states if num_scheduled[s.req_id] != 1]
    order = decodes + prefills

    input_ids: list[int] = []
    positions: list[int] = []
    qsl = [0]
    seq_lens: list[int] = []
    sample_rows: list[int] = []
    logits_idx: list[int] = []
    pending_index: list[int] = []
    pending_states: list[CachedRequestState] = []
    max_blocks = 1
    for row, s in enumerate(order):
        start = s.num_computed_tokens
        n = num_scheduled[s.req_id]
        end = start + n
        input_ids.extend(s.token_ids[start:end])
        if s.token_ids[end - 1] == PENDING_TOKEN:
            pending_index.append(len(input_ids) - 1)
            pending_states.append(s)
        positions.extend(range(start, end))
        qsl.append(qsl[-1] + n)
        seq_lens.append(end)
        max_blocks = max(max_blocks, len(s.block_ids))
        if end == len(s.token_ids):
            sample_rows.append(row)
            logits_idx.append(qsl[-1] - 1)

    # One tensor from padded host rows (not one small tensor per row).
    tables = torch.tensor([s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in order], dtype=torch.int32)
    pos = torch.tensor(positions, dtype=torch.int64)
    seq_of_token = torch.repeat_interleave(
        torch.arange(len(order)), torch.tensor([qsl[i + 1] - qsl[i] for i in range(len(order))])
    )
    block_of_token = tables[seq_of_token, pos // block_size].to(torch.int64)
    slot_mapping = block_of_token * block_size + pos % block_size

    attn = AttentionMetadata(
        num_decodes=len(decodes),
        slot_mapping=to_device(slot_mapping, device),
        query_start_loc=to_device(torch.tensor(qsl, dtype=torch.int32), device),
        seq_lens=to_device(torch.tensor(seq_lens, dtype=torch.int32), device),
        block_tables=to_device(tables, device),
        max_query_len=max(num_scheduled[s.req_id] for s in order),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )
    return ModelInputs(
        input_ids=to_device(torch.tensor(input_ids, dtype=torch.int64), device),
        positions=to_device(pos, device),
        attn=attn,
        req_order=order,
        sample_rows=sample_rows,
        logits_indices=to_device(torch.tensor(logits_idx, dtype=torch.int64), device),
        pending_index=pending_index,
        pending_states=pending_states,
    )

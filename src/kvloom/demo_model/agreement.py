"""How close a quantized engine's model is to the float one, teacher-forced on held-out chats.

Both models are kvloom's own (``models.loader.load_model``, the same loader the engine uses): the float
model in float32 over a float32 KV cache, the other with ``quantization`` and/or ``kv_cache_dtype``. Each
sequence (a held-out chat: prompt and reference reply, rendered with the chat template; or several chats
back to back, for long contexts) runs through both as one prefill that stores its K/V in the cache and
reads them back from it; at every reply position (where the training loss counts) the two models' top-1
tokens are compared, and each model's loss on the reference token feeds its perplexity.
``--quantization`` / ``--kv-cache-dtype`` on ``eval-demo-model`` print these beside the task figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvloom.demo_model.corpus import Example


@dataclass(frozen=True, slots=True)
class Agreement:
    """Top-1 agreement over ``positions`` reply positions, and each model's perplexity on the reference replies."""

    positions: int
    top1_agreement: float
    float_perplexity: float
    quantized_perplexity: float

    def line(self, what: str) -> str:
        change = 100 * (self.quantized_perplexity / self.float_perplexity - 1)
        return (f"{what} vs float32, teacher-forced on {self.positions} reply positions: top-1 agreement "
                f"{100 * self.top1_agreement:.2f}%; perplexity {self.float_perplexity:.4f} -> "
                f"{self.quantized_perplexity:.4f} ({change:+.2f}%)")


@torch.no_grad()
def sequence_logits(model: Any, tokens: list[int], kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """kvloom ``model``'s logits ``[len(tokens), vocab]`` for one sequence, as one prefill over a fresh paged
    cache (blocks 0, 1, ... in order) in ``kv_dtype`` (default: the model's; ``torch.int8``: ``kv_int8`` rows)."""
    from kvloom.layers.attention_metadata import AttentionMetadata
    from kvloom.runner.kv_tensors import allocate_kv_caches

    config = model.config
    block = 16
    blocks = -(-len(tokens) // block)
    caches = allocate_kv_caches(config, blocks, block, kv_dtype or config.torch_dtype, torch.device("cpu"))
    n = len(tokens)
    meta = AttentionMetadata(
        num_decodes=0, slot_mapping=torch.arange(n, dtype=torch.int64),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32), seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None, :], max_query_len=n, max_seq_len=n,
        query_start_loc_cpu=[0, n], seq_lens_cpu=[n])
    hidden = model(torch.tensor(tokens, dtype=torch.int64), torch.arange(n, dtype=torch.int64), caches, meta)
    logits: torch.Tensor = model.compute_logits(hidden)
    return logits


def measure(model_dir: Path, examples: list[Example], quantization: str | None = None,
            kv_cache_dtype: str = "auto", join: int = 1) -> Agreement:
    """Compare ``quantization`` and ``kv_cache_dtype`` with float32 on ``examples``, ``join`` chats back to back
    per sequence (see the module doc)."""
    from transformers import AutoTokenizer

    from kvloom.demo_model.data import encode
    from kvloom.layers.attention import TorchAttentionBackend
    from kvloom.models.loader import load_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    backend = TorchAttentionBackend()
    reference, _ = load_model(model_dir, attn_backend=backend, dtype="float32")
    quantized = reference
    if quantization is not None:
        quantized, _ = load_model(model_dir, attn_backend=backend, dtype="float32", quantization=quantization)  # type: ignore[arg-type]
    kv_dtype = torch.int8 if kv_cache_dtype == "int8" else None
    same = positions = 0
    losses = [0.0, 0.0]
    for first in range(0, len(examples), join):
        ids, mask = [], []
        for example in examples[first:first + join]:
            more_ids, more_mask = encode(example, tokenizer)
            ids += more_ids
            mask += more_mask
        limit = reference.config.max_position_embeddings  # the rest of the last chat is cut off
        ids, mask = ids[:limit], mask[:limit]
        # Position t predicts token t + 1; it counts when that token is part of a reply.
        rows = [t for t in range(len(ids) - 1) if mask[t + 1]]
        if not rows:
            continue
        target = torch.tensor([ids[t + 1] for t in rows])
        a = sequence_logits(reference, ids)[rows]
        b = sequence_logits(quantized, ids, kv_dtype)[rows]
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += len(rows)
        for i, logits in enumerate((a, b)):
            losses[i] += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
    return Agreement(positions, same / max(1, positions), math.exp(losses[0] / max(1, positions)),
                     math.exp(losses[1] / max(1, positions)))

"""Shared fixtures: tiny checkpoints (built once per session) and a paged-KV step builder."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from kvloom.layers.attention import AttentionBackend, TorchAttentionBackend
from kvloom.layers.attention_metadata import AttentionMetadata
from kvloom.models.config import ModelConfig
from kvloom.models.tiny import build_checkpoint

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With head_dim 16 and theta 5e5 the wavelengths are 6.3, 32, 167, ...: one in each llama3 band.
    "original_max_position_embeddings": 64,
}

# name -> build_checkpoint kwargs. Odd sizes on purpose (GQA 3:1, head_dim != hidden/heads for qwen3).
VARIANTS: dict[str, dict[str, Any]] = {
    "llama": dict(arch="llama"),
    "mistral": dict(arch="mistral", num_heads=4, num_kv_heads=1),
    "qwen2": dict(arch="qwen2", hidden_size=48, num_heads=6, num_kv_heads=2, intermediate_size=96),
    "qwen3": dict(arch="qwen3", num_heads=6, num_kv_heads=2, head_dim=8, intermediate_size=96),
    "llama_tied": dict(arch="llama", tie_word_embeddings=True),
    "llama_rope_llama3": dict(arch="llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "llama_rope_linear": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    """Each VARIANTS name in turn."""
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def checkpoints(checkpoint_root: Path) -> dict[str, Path]:
    """Every VARIANTS entry built as a real HF checkpoint directory (unsharded, float32)."""
    return {
        name: build_checkpoint(checkpoint_root / name, seed=i, **kw)
        for i, (name, kw) in enumerate(VARIANTS.items())
    }


@pytest.fixture(scope="session")
def sharded_llama(checkpoint_root: Path) -> tuple[Path, Path]:
    """(unsharded, sharded) llama checkpoints with the same seed: identical weights."""
    single = build_checkpoint(checkpoint_root / "same_single", seed=7, with_tokenizer=False)
    sharded = build_checkpoint(
        checkpoint_root / "same_sharded", seed=7, max_shard_size="60KB", with_tokenizer=False
    )
    return single, sharded


@pytest.fixture(scope="session")
def attn_backend() -> AttentionBackend:
    return TorchAttentionBackend()


@pytest.fixture(scope="session")
def paged_kv() -> type[PagedKV]:
    """The PagedKV class, for tests that build steps by hand."""
    return PagedKV


@dataclass
class PagedKV:
    """Allocates a poisoned paged cache and builds (input_ids, positions, meta) for each step.

    Blocks are handed out from a shuffled free list so a sequence's blocks are not contiguous.
    """

    config: ModelConfig
    block_size: int = 4
    num_blocks: int = 64
    tokens: dict[int, list[int]] = field(default_factory=dict)
    tables: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        shape = (self.num_blocks, self.block_size, self.config.num_kv_heads, self.config.head_dim)
        # Finite garbage: a backend reading a slot it never wrote gets visibly wrong outputs.
        self.kv_caches = [
            (torch.randn(shape, generator=gen) * 100, torch.randn(shape, generator=gen) * 100)
            for _ in range(self.config.num_layers)
        ]
        self.free = list(range(self.num_blocks))
        random.Random(0).shuffle(self.free)

    def step(self, new_tokens: dict[int, list[int]]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Schedule ``seq_id -> tokens to append``. Query-length-1 sequences must come first."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        for seq_id, toks in new_tokens.items():
            seq = self.tokens.setdefault(seq_id, [])
            table = self.tables.setdefault(seq_id, [])
            for tok in toks:
                pos = len(seq)
                if pos // self.block_size >= len(table):
                    table.append(self.free.pop())
                seq.append(tok)
                ids.append(tok)
                positions.append(pos)
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            qsl.append(qsl[-1] + len(toks))
            seq_lens.append(len(seq))
        query_lens = [len(t) for t in new_tokens.values()]
        num_decodes = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
        assert all(n != 1 for n in query_lens[num_decodes:]), "decodes must come first"
        max_blocks = max(len(self.tables[s]) for s in new_tokens)
        block_tables = torch.zeros(len(new_tokens), max_blocks, dtype=torch.int32)
        for row, seq_id in enumerate(new_tokens):
            block_tables[row, : len(self.tables[seq_id])] = torch.tensor(
                self.tables[seq_id], dtype=torch.int32
            )
        meta = AttentionMetadata(
            num_decodes=num_decodes,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=block_tables,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        return torch.tensor(ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), meta

"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a flattened batch and a paged KV cache.

Our own modeling code, gpt-fast / nano-vllm style: the batch is one row of ``T`` tokens from
several sequences (no padding, no batch dim); attention, including the K/V writes into the
paged cache, is the backend's job. Projections are fused (q/k/v in one GEMM, gate/up in one)
and ``load_weights`` maps HF checkpoint names onto the fused parameters.

Variants, all switched by ``ModelConfig``: qkv bias (Qwen2), o_proj / MLP bias (Llama
``attention_bias`` / ``mlp_bias``), per-head q/k RMSNorm before RoPE (Qwen3), tied embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from kvloom.errors import CheckpointError
from kvloom.layers.activation import SiluAndMul
from kvloom.layers.linear import Embedding, Linear, MergedLinear
from kvloom.layers.norm import RMSNorm
from kvloom.layers.rotary import ApplyRotary, RotaryEmbedding
from kvloom.models.config import ModelConfig
from kvloom.models.registry import CausalLM

if TYPE_CHECKING:
    from kvloom.layers.attention import AttentionBackend
    from kvloom.layers.attention_metadata import AttentionMetadata

KVCache = tuple[torch.Tensor, torch.Tensor]
"""One layer's (k_cache, v_cache), each ``[num_blocks, block_size, num_kv_heads, head_dim]``."""

# Checkpoint tensors that carry no information for us (older HF checkpoints saved them).
_HARMLESS_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# Fused parameter -> the HF projections stacked in it, in shard order.
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class LlamaAttention(nn.Module):
    """q/k/v projection (fused), optional q/k norm, RoPE, paged attention, output projection."""

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend) -> None:
        super().__init__()
        dtype, d = config.torch_dtype, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.q_size, self.kv_size = config.num_heads * d, config.num_kv_heads * d
        self.scale = d**-0.5
        self.qkv_proj = MergedLinear(
            config.hidden_size, [self.q_size, self.kv_size, self.kv_size], config.attention_bias, dtype,
            lora_names=_FUSED["qkv_proj"],
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, config.o_proj_bias, dtype, lora_names=("o_proj",))
        self.q_norm = RMSNorm(d, config.rms_norm_eps, dtype) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps, dtype) if config.qk_norm else None
        self.rotary = ApplyRotary()
        self.attn_backend = attn_backend

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x ``[T, hidden]``, cos/sin ``[T, 1, head_dim // 2]`` -> ``[T, hidden]``.

        q/k/v reach the backend as strided views (last dim contiguous), not copies.
        """
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        qk_size = self.q_size + self.kv_size
        v = qkv[:, qk_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is None or self.k_norm is None:
            # One rotary pass over q and k heads together.
            qk = self.rotary(qkv[:, :qk_size].view(num_tokens, -1, self.head_dim), cos, sin)
            q, k = torch.split(qk, [self.num_heads, self.num_kv_heads], dim=1)
        else:
            q = self.q_norm(qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, self.q_size : qk_size].view(num_tokens, self.num_kv_heads, self.head_dim))
            q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        attn = self.attn_backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        out: torch.Tensor = self.o_proj(attn.reshape(num_tokens, self.q_size))
        return out


class LlamaMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate/up fused into one GEMM."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        size, dtype = config.intermediate_size, config.torch_dtype
        self.gate_up_proj = MergedLinear(
            config.hidden_size, [size, size], config.mlp_bias, dtype, lora_names=_FUSED["gate_up_proj"]
        )
        self.act = SiluAndMul()
        self.down_proj = Linear(size, config.hidden_size, config.mlp_bias, dtype, lora_names=("down_proj",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[T, hidden]`` -> ``[T, hidden]``."""
        out: torch.Tensor = self.down_proj(self.act(self.gate_up_proj(x)))
        return out


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block. The residual stream is carried separately so each norm fuses its add."""

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend) -> None:
        super().__init__()
        eps, dtype = config.rms_norm_eps, config.torch_dtype
        self.self_attn = LlamaAttention(config, attn_backend)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) ``[T, hidden]`` -> (this block's MLP output, residual before it).

        The block's full output is ``mlp_out + residual``; the next norm performs that add.
        """
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.forward_add(x, residual)
        x = self.self_attn(x, cos, sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm.forward_add(x, residual)
        out: torch.Tensor = self.mlp(x)
        return out, residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm."""

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend) -> None:
        super().__init__()
        dtype = config.torch_dtype
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling, dtype
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, attn_backend) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches has {len(kv_caches)} layers, the model has {len(self.layers)}")
        x: torch.Tensor = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
        if residual is None:  # no layers
            return self.norm.forward(x)
        return self.norm.forward_add(x, residual)[0]


class LlamaForCausalLM(CausalLM):
    """A Llama-family causal LM. Parameters start uninitialised; fill them with ``load_weights``.

    Construct under ``with torch.device(device)`` to allocate on that device; parameters are
    in ``config.torch_dtype``.
    """

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend) -> None:
        super().__init__(config, attn_backend)
        self.model = LlamaModel(config, attn_backend)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, False, config.torch_dtype)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids/positions ``[T]`` int64, one ``(k_cache, v_cache)`` per layer -> hidden ``[T, hidden]``.

        Returns the final-normed hidden states; call ``compute_logits`` on the rows you sample.
        Writes this step's K/V into the caches at ``meta.slot_mapping``.
        """
        hidden: torch.Tensor = self.model(input_ids, positions, kv_caches, meta)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[N, hidden]`` -> logits ``[N, vocab_size]`` float32."""
        if self.lm_head is not None:
            logits: torch.Tensor = self.lm_head(hidden)  # through the layer: its weight may be packed
            return logits.float()
        return torch.nn.functional.linear(hidden, self.model.embed_tokens.weight).float()

    def untie_lm_head(self) -> None:
        """Tied embeddings: ``lm_head`` becomes a ``Linear`` holding the embedding matrix (shared, not
        copied), so it can take another layout (``quantization``); the checkpoint stays tied."""
        if self.lm_head is not None:
            return
        weight = self.model.embed_tokens.weight
        head = Linear(self.config.hidden_size, self.config.vocab_size, False, weight.dtype)
        head.weight = weight
        self.lm_head = head

    def _weight_targets(self) -> dict[str, tuple[torch.Tensor, slice | None]]:
        """HF checkpoint name -> (our parameter, its rows that hold it; ``None`` = all of it).

        Linear weights packed for oneDNN (``Linear.pack_onednn``) are buffers, named the same."""
        targets: dict[str, tuple[torch.Tensor, slice | None]] = {}
        modules = dict(self.named_modules())
        packed = [(f"{name}.weight", m.weight) for name, m in modules.items() if isinstance(m, Linear) and m.onednn_packed]
        for name, param in [*self.named_parameters(), *packed]:
            module_name, _, kind = name.rpartition(".")
            prefix, _, leaf = module_name.rpartition(".")
            module = modules[module_name]
            if leaf in _FUSED and isinstance(module, MergedLinear):
                for index, hf_leaf in enumerate(_FUSED[leaf]):
                    targets[f"{prefix}.{hf_leaf}.{kind}"] = (param, module.shard_rows(index))
            else:
                targets[name] = (param, None)
        return targets

    def expected_weight_names(self) -> set[str]:
        """Every HF tensor name this model needs (``lm_head.weight`` excluded when tied)."""
        return set(self._weight_targets())

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into the (fused) parameters; returns the names loaded.

        Casts to the parameter dtype/device. Raises ``CheckpointError`` naming the key for an
        unexpected name, a shape that doesn't fit the config, or a name seen twice. Known
        harmless extras (``rotary_emb.inv_freq``, ``lm_head.weight`` when tied) are skipped.
        Completeness is the caller's check: compare the result with ``expected_weight_names()``.
        """
        if any(isinstance(m, Linear) and m.onednn_packed for m in self.modules()):
            raise CheckpointError("load_weights after the Linear weights were packed for oneDNN: load them first")
        targets = self._weight_targets()
        loaded: set[str] = set()
        for name, tensor in weights:
            target = targets.get(name)
            if target is None:
                if name.endswith(_HARMLESS_SUFFIXES) or (name == "lm_head.weight" and self.lm_head is None):
                    continue
                raise CheckpointError(
                    f"unexpected weight '{name}' (not a parameter of {self.config.architecture})"
                )
            if name in loaded:
                raise CheckpointError(f"weight '{name}' appears more than once")
            param, rows = target
            dest = param.data if rows is None else param.data[rows]
            if tuple(tensor.shape) != tuple(dest.shape):
                raise CheckpointError(
                    f"weight '{name}' has shape {tuple(tensor.shape)}, the config implies {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            loaded.add(name)
        return loaded

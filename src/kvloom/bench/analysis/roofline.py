"""The memory-bandwidth roofline of decoding (``bench decode``): the most decode tokens/s a
machine can give, counted from the bytes a decode step must read.

A decode step at concurrency ``C`` (every one of ``C`` sequences gets one token) is memory-bound:
it reads every weight of the linear layers and of the LM head once (``floor.model_params``:
q, k, v, o, gate, up, down of every layer, plus ``vocab x hidden``), whatever ``C``, and the K and
V of every sequence's context::

    step_bytes = (linear + lm_head params) x dtype_bytes
               + C x context x num_layers x 2 x num_kv_heads x head_dim x dtype_bytes

Left out (small): the embedding lookup (``C`` rows, not the table), norms, biases, and the
activations. With a prompt of ``P`` tokens and ``L`` output tokens, the first output token comes
from the prefill and decode step ``j`` (``j = 1 .. L-1``) attends ``P + j`` tokens, so the mean
context over the decode steps is ``P + L/2``; the bytes being linear in the context, the ``L-1``
steps read as much as ``L-1`` steps at that mean. At ``bandwidth`` bytes/s::

    step_s = step_bytes(context = P + L/2) / bandwidth
    roofline decode tokens/s = C / step_s
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvloom.bench.analysis.floor import BYTES_PER_PARAM, model_params


@dataclass(frozen=True, slots=True)
class DecodeShape:
    """What a decode step reads, per step and per token of context, in values (not bytes)."""

    weight_params: int
    """Linear layers plus the LM head: read once a step."""
    kv_values_per_token: int
    """``num_layers x 2 x num_kv_heads x head_dim``: the K and V of one token, all layers."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DecodeShape:
        """From a Llama/Mistral/Qwen-shaped ``config.json`` dict (or its ``text_config``)."""
        params = model_params(config)
        if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
            config = config["text_config"]
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        return cls(weight_params=params.linear + params.lm_head,
                   kv_values_per_token=int(config["num_hidden_layers"]) * 2 * kv_heads * head_dim)


@dataclass(frozen=True, slots=True)
class Roofline:
    """One concurrency's roofline."""

    concurrency: int
    context: float
    """Mean context length (tokens) over the decode steps."""
    weight_bytes: int
    kv_bytes: float
    bandwidth_gbps: float

    @property
    def step_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def step_s(self) -> float:
        return self.step_bytes / (self.bandwidth_gbps * 1e9)

    @property
    def tokens_per_s(self) -> float:
        """Decode tokens/s at the roofline: ``concurrency`` tokens every ``step_s``."""
        return self.concurrency / self.step_s

    def as_dict(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "mean_context": self.context, "weight_bytes": self.weight_bytes,
                "kv_bytes": round(self.kv_bytes), "step_bytes": round(self.step_bytes),
                "bandwidth_gbps": self.bandwidth_gbps, "step_s": float(f"{self.step_s:.4g}"),
                "decode_tokens_per_s": round(self.tokens_per_s, 2)}


def mean_decode_context(prompt_len: int, output_len: int) -> float:
    """Mean tokens attended over the ``output_len - 1`` decode steps: ``prompt_len + output_len / 2``."""
    return prompt_len + output_len / 2


def roofline(shape: DecodeShape, dtype: str, bandwidth_gbps: float, *, concurrency: int, prompt_len: int,
             output_len: int) -> Roofline:
    """The roofline of ``concurrency`` sequences of ``prompt_len`` prompt tokens each decoding to
    ``output_len`` tokens, weights and KV in ``dtype``, memory at ``bandwidth_gbps`` GB/s."""
    size = BYTES_PER_PARAM[dtype]
    context = mean_decode_context(prompt_len, output_len)
    return Roofline(concurrency=concurrency, context=context, weight_bytes=shape.weight_params * size,
                    kv_bytes=concurrency * context * shape.kv_values_per_token * size,
                    bandwidth_gbps=bandwidth_gbps)


def decode_tokens_per_s(concurrency: int, output_len: int, end_s: float, all_first_s: float) -> float | None:
    """``C x (output_len - 1) / (end - all_first)``: the tokens after each request's first, over the
    time from the moment every request has its first token to the end (None for an empty window).

    Every request is counted from its first token on; where prefills were staggered (chunked,
    interleaved with decodes) some decode tokens precede ``all_first``, which favours that system."""
    window = end_s - all_first_s
    return concurrency * (output_len - 1) / window if window > 0 else None

"""The GEMM floor of an offline workload on this machine: the least time its linear layers need.

A lower bound made of the two things no engine can skip, timed at the ceilings ``machine``
measured in the same run, in the dtype kvloom runs in:

- prefill: every prompt token through every linear layer (``2 x linear params`` FLOPs a token),
  plus the lm_head for one row per request, at the 2048^3 matmul rate;
- decode: ``output_len - 1`` steps of one token for every request at once (``B = num_requests``),
  each step the larger of its FLOPs (``B x 2 x (linear + lm_head params)``) at the ``M = 64``
  linear rate and of reading those weights once at the copy bandwidth.

"Linear params" are the attention (q, k, v, o) and MLP (gate, up, down) projections of every
layer, counted from ``config.json`` (Llama / Mistral / Qwen shapes); the embedding (a lookup) and
the lm_head are apart. Attention itself, norms, biases and sampling are left out: the floor is
what the GEMMs alone cost, so an engine at 100% of it would spend no time on anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}
CEILING_SUFFIX = {"float32": "", "bfloat16": "_bf16"}
"""A dtype's suffix in ``machine.measure_ceilings``' keys (float16 is never measured)."""


@dataclass(frozen=True, slots=True)
class ModelParams:
    """Parameter counts of a decoder-only checkpoint, by the role they play in the floor."""

    linear: int
    """q, k, v, o and gate, up, down projections, all layers (biases not counted)."""
    lm_head: int
    """``vocab x hidden``: read and multiplied every step, tied to the embedding or not."""
    embedding: int
    tie_word_embeddings: bool

    @property
    def total(self) -> int:
        """Distinct weights (norms and biases aside): a tied lm_head is the embedding."""
        return self.linear + self.embedding + (0 if self.tie_word_embeddings else self.lm_head)


@dataclass(frozen=True, slots=True)
class Rates:
    """The ceilings the floor is timed at, in one dtype."""

    matmul_gflops: float
    """2048^3 matmul: the prefill GEMMs' rate."""
    linear_m64_gflops: float
    """``[64, 1024] x [1024, 2816]``: the decode GEMMs' rate."""
    copy_gbps: float
    """Bytes copied per second: the rate the decode steps read the weights at."""


@dataclass(frozen=True, slots=True)
class Floor:
    """Seconds the workload's GEMMs need at least; ``tokens_per_s`` counts the output tokens."""

    prefill_s: float
    decode_s: float
    decode_step_s: float
    decode_bound: str
    """``"compute"`` or ``"memory"``: which of the two a decode step's floor is."""
    output_tokens: int

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.total_s


def model_params(config: dict[str, Any]) -> ModelParams:
    """Counts from a Llama/Mistral/Qwen-shaped ``config.json`` dict (or its ``text_config``)."""
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    layers = int(config["num_hidden_layers"])
    vocab = int(config["vocab_size"])
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    mlp = 3 * hidden * inter  # gate, up, down
    return ModelParams(linear=layers * (attention + mlp), lm_head=vocab * hidden, embedding=vocab * hidden,
                       tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))


def read_model_params(model_dir: Path) -> ModelParams:
    """``model_params`` of ``model_dir/config.json``."""
    config = json.loads((model_dir / "config.json").read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{model_dir}/config.json is not a JSON object")
    return model_params(config)


def rates_for(ceilings: dict[str, float], dtype: str) -> Rates | None:
    """``dtype``'s rates from ``machine.measure_ceilings``' result; None where they were not
    measured (bf16 on a CPU without fast bf16, float16 anywhere)."""
    suffix = CEILING_SUFFIX.get(dtype)
    keys = (f"matmul_2048{suffix}_gflops", f"linear_m64{suffix}_gflops", "copy_gbps")
    if suffix is None or any(not ceilings.get(k) for k in keys):
        return None
    return Rates(*(float(ceilings[k]) for k in keys))


def workload_floor(params: ModelParams, rates: Rates, *, prompt_tokens: int, num_requests: int, output_len: int,
                   bytes_per_param: int) -> Floor:
    """The floor of ``num_requests`` requests with ``prompt_tokens`` prompt tokens in all, each
    generating ``output_len`` tokens (the first from its prefill, the rest from decode steps)."""
    prefill_flops = prompt_tokens * 2 * params.linear + num_requests * 2 * params.lm_head
    prefill_s = prefill_flops / (rates.matmul_gflops * 1e9)
    step_params = params.linear + params.lm_head
    compute_s = num_requests * 2 * step_params / (rates.linear_m64_gflops * 1e9)
    memory_s = step_params * bytes_per_param / (rates.copy_gbps * 1e9)
    step_s = max(compute_s, memory_s)
    return Floor(prefill_s=prefill_s, decode_s=(output_len - 1) * step_s, decode_step_s=step_s,
                 decode_bound="compute" if compute_s >= memory_s else "memory",
                 output_tokens=num_requests * output_len)


def floor_result(model_dir: Path, ceilings: dict[str, float], dtype: str, *, prompt_tokens: int,
                 num_requests: int, output_len: int, wall_s: float) -> dict[str, Any]:
    """The floor as the benchmark's JSON records it, with ``wall_s`` (kvloom's) as a percentage
    of it; ``floor_s`` is None (and ``reason`` says why) where ``dtype``'s ceilings are missing."""
    params = read_model_params(model_dir)
    entry: dict[str, Any] = {"dtype": dtype, "params": {"linear": params.linear, "lm_head": params.lm_head,
                                                        "embedding": params.embedding, "total": params.total}}
    rates = rates_for(ceilings, dtype)
    if rates is None:
        return entry | {"floor_s": None, "reason": f"no {dtype} ceilings were measured on this machine"}
    floor = workload_floor(params, rates, prompt_tokens=prompt_tokens, num_requests=num_requests,
                           output_len=output_len, bytes_per_param=BYTES_PER_PARAM[dtype])
    return entry | {
        "rates": {"matmul_gflops": rates.matmul_gflops, "linear_m64_gflops": rates.linear_m64_gflops,
                  "copy_gbps": rates.copy_gbps},
        "prefill_s": _sig(floor.prefill_s), "decode_s": _sig(floor.decode_s),
        "decode_step_s": _sig(floor.decode_step_s), "decode_bound": floor.decode_bound,
        "floor_s": _sig(floor.total_s), "floor_tokens_per_s": _sig(floor.tokens_per_s),
        "kvloom_pct_of_floor": round(100 * floor.total_s / wall_s, 1),
    }


def _sig(value: float) -> float:
    """Four significant digits (a tiny test model's floor is microseconds, the standard one's ~15 s)."""
    return float(f"{value:.4g}")

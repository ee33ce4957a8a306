"""What kvloom reads from a HF checkpoint's ``config.json`` (+ ``generation_config.json``).

Both config generations are accepted: transformers 4.x (``rope_theta`` and ``rope_scaling``
with ``type`` or ``rope_type``, ``torch_dtype``) and 5.x (``rope_parameters`` holding
``rope_type`` and ``rope_theta``, ``dtype``). Everything kvloom cannot run exactly is refused
here, with the field at fault named, rather than producing wrong outputs later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvloom.errors import CheckpointError, UnsupportedModelError
from kvloom.layers.rotary import RopeScaling
from kvloom.models.architectures import supported_architectures

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A decoder-only Llama-family model, as kvloom runs it. Immutable; built by ``load_model_config``."""

    architecture: str
    """One of ``architectures.supported_architectures()``."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Divides ``num_heads`` (GQA group size ``num_heads // num_kv_heads``)."""
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    """Bias on the q/k/v projections (Qwen2 always; Llama/Qwen3 when ``attention_bias``)."""
    o_proj_bias: bool
    """Bias on the output projection (Llama/Qwen3 ``attention_bias``; never Qwen2)."""
    mlp_bias: bool
    qk_norm: bool
    """Per-head RMSNorm on q and k before RoPE (Qwen3)."""
    hidden_act: str
    torch_dtype: torch.dtype
    """The checkpoint's dtype; the loader replaces it with the dtype the model runs in."""
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e.strerror or e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class _Fields:
    """Typed access to a config dict; every error names the file and the field."""

    def __init__(self, data: dict[str, Any], path: Path) -> None:
        self.data = data
        self.path = path

    def fail(self, field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: field '{field}' {why}")

    def get_int(self, field: str, default: int | None = None, value: Any = None) -> int:
        value = self.data.get(field, default) if value is None else value
        if value is None:
            raise self.fail(field, "is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(field, f"must be a positive integer, got {value!r}")
        return value

    def get_float(self, field: str, default: float, value: Any = None) -> float:
        value = self.data.get(field, default) if value is None else value
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(field, f"must be a number, got {value!r}")
        return float(value)

    def get_bool(self, field: str, default: bool) -> bool:
        value = self.data.get(field, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(field, f"must be true or false, got {value!r}")
        return value


def _architecture(f: _Fields) -> str:
    archs = f.data.get("architectures")
    if archs is None:
        model_type = f.data.get("model_type")
        if model_type in _MODEL_TYPE_TO_ARCH:
            return _MODEL_TYPE_TO_ARCH[model_type]
        raise f.fail("architectures", f"is missing (and model_type {model_type!r} is not recognised)")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise f.fail("architectures", f"must be a non-empty list of names, got {archs!r}")
    supported = supported_architectures()
    if archs[0] not in supported:
        raise UnsupportedModelError(
            f"{f.path}: architectures {archs[0]!r} is not supported; supported: {', '.join(supported)}"
        )
    return archs[0]


def _rope(f: _Fields, max_position_embeddings: int) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``."""
    field = "rope_parameters" if f.data.get("rope_parameters") is not None else "rope_scaling"
    params = f.data.get(field) or {}
    if not isinstance(params, dict):
        raise f.fail(field, f"must be an object, got {params!r}")
    theta = f.get_float("rope_theta", 10000.0, value=params.get("rope_theta"))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{f.path}: {field}.rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", f.data.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(
            f"{f.path}: partial_rotary_factor {partial!r} is not supported (only 1.0)"
        )
    if rope_type == "default":
        return theta, None
    if params.get("factor") is None:
        raise f.fail(f"{field}.factor", f"is missing (required for rope_type {rope_type!r})")
    factor = f.get_float(f"{field}.factor", 1.0, value=params["factor"])
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor)
    original = params.get("original_max_position_embeddings") or max_position_embeddings
    return theta, RopeScaling(
        "llama3",
        factor,
        low_freq_factor=f.get_float(f"{field}.low_freq_factor", 1.0, value=params.get("low_freq_factor")),
        high_freq_factor=f.get_float(f"{field}.high_freq_factor", 4.0, value=params.get("high_freq_factor")),
        original_max_position_embeddings=f.get_int(
            f"{field}.original_max_position_embeddings", value=original
        ),
    )


def _check_sliding_window(f: _Fields, architecture: str, max_position_embeddings: int) -> None:
    window = f.data.get("sliding_window")
    if architecture == "MistralForCausalLM":
        if window is not None and (not isinstance(window, int) or window < max_position_embeddings):
            raise UnsupportedModelError(
                f"{f.path}: sliding_window={window} < max_position_embeddings={max_position_embeddings} "
                "is not supported (sliding-window attention); set sliding_window to null for full attention"
            )
    elif architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and f.get_bool("use_sliding_window", False):
        raise UnsupportedModelError(
            f"{f.path}: use_sliding_window=true is not supported (sliding_window={window})"
        )


def _dtype(f: _Fields) -> torch.dtype:
    field = "dtype" if f.data.get("dtype") is not None else "torch_dtype"
    name = f.data.get(field) or "float32"
    if name not in _DTYPES:
        raise f.fail(field, f"must be one of {', '.join(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _token_ids(value: Any, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise CheckpointError(f"{where}: field 'eos_token_id' must be an id or a list of ids, got {value!r}")
    return tuple(dict.fromkeys(items))  # dedup, keep order


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Parse ``model_dir/config.json`` (and ``generation_config.json`` when present).

    Raises ``CheckpointError`` (missing/invalid file, missing or mistyped field) or
    ``UnsupportedModelError`` (architecture, rope type, sliding window, activation).
    EOS ids come from ``generation_config.json`` (an int or a list), else from config.json.
    """
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json not found in {model_dir}")
    f = _Fields(_read_json(path), path)
    architecture = _architecture(f)
    hidden_size, num_heads = f.get_int("hidden_size"), f.get_int("num_attention_heads")
    num_kv_heads = f.get_int("num_key_value_heads", num_heads)
    if num_heads % num_kv_heads:
        raise f.fail("num_key_value_heads", f"({num_kv_heads}) must divide num_attention_heads ({num_heads})")
    if f.data.get("head_dim") is None and hidden_size % num_heads:
        raise f.fail(
            "head_dim", f"is missing and hidden_size {hidden_size} is not divisible by {num_heads} heads"
        )
    head_dim = f.get_int("head_dim", hidden_size // num_heads)
    max_pos = f.get_int("max_position_embeddings", 2048)
    rope_theta, rope_scaling = _rope(f, max_pos)
    _check_sliding_window(f, architecture, max_pos)
    hidden_act = f.data.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise UnsupportedModelError(f"{path}: hidden_act {hidden_act!r} is not supported (only 'silu')")
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    has_bias = architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM") and f.get_bool(
        "attention_bias", False
    )
    mlp_bias = architecture == "LlamaForCausalLM" and f.get_bool("mlp_bias", False)

    eos = _token_ids(f.data.get("eos_token_id"), str(path))
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        gen = _read_json(gen_path)
        eos = _token_ids(gen["eos_token_id"], str(gen_path)) if gen.get("eos_token_id") is not None else eos
    bos = f.data.get("bos_token_id")
    return ModelConfig(
        architecture=architecture,
        vocab_size=f.get_int("vocab_size"),
        hidden_size=hidden_size,
        num_layers=f.get_int("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=f.get_int("intermediate_size"),
        rms_norm_eps=f.get_float("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=f.get_bool("tie_word_embeddings", False),
        attention_bias=is_qwen2 or has_bias,
        o_proj_bias=has_bias,
        mlp_bias=mlp_bias,
        qk_norm=architecture == "Qwen3ForCausalLM",
        hidden_act=hidden_act,
        torch_dtype=_dtype(f),
        eos_token_ids=eos,
        bos_token_id=bos if isinstance(bos, int) and not isinstance(bos, bool) else None,
    )

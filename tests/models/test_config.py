"""config.json parsing: both transformers config generations, and every refusal names its field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kvloom.errors import CheckpointError, UnsupportedModelError
from kvloom.layers.rotary import RopeScaling
from kvloom.models.config import load_model_config

BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "eos_token_id": 2,
    "bos_token_id": 1,
}


def write(
    tmp_path: Path,
    generation: dict[str, Any] | str | None = None,
    drop: tuple[str, ...] = (),
    **overrides: Any,
) -> Path:
    config = {k: v for k, v in {**BASE, **overrides}.items() if k not in drop}
    (tmp_path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        text = generation if isinstance(generation, str) else json.dumps(generation)
        (tmp_path / "generation_config.json").write_text(text)
    return tmp_path


def test_legacy_format_linear_rope_and_torch_dtype(tmp_path: Path) -> None:
    cfg = load_model_config(
        write(
            tmp_path,
            rope_theta=50000.0,
            rope_scaling={"type": "linear", "factor": 2.0},
            torch_dtype="bfloat16",
        )
    )
    assert cfg.rope_theta == 50000.0
    assert cfg.rope_scaling == RopeScaling("linear", 2.0)
    assert cfg.torch_dtype == torch.bfloat16
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps) == (4, 2, 16, 1e-5)
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1


def test_legacy_format_llama3_rope_type_defaults_original_context(tmp_path: Path) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    cfg = load_model_config(write(tmp_path, rope_theta=500000.0, rope_scaling=scaling))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=1024)


def test_transformers5_rope_parameters_and_dtype(tmp_path: Path) -> None:
    params = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 8.0,
        "original_max_position_embeddings": 256,
    }
    cfg = load_model_config(write(tmp_path, rope_parameters=params, dtype="float16"))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 32.0, 2.0, 8.0, 256)
    assert cfg.torch_dtype == torch.float16


def test_default_rope_in_both_formats(tmp_path: Path) -> None:
    cfg = load_model_config(write(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert (cfg.rope_theta, cfg.rope_scaling) == (1e6, None)
    cfg = load_model_config(write(tmp_path, rope_theta=123.0, rope_scaling=None))
    assert (cfg.rope_theta, cfg.rope_scaling) == (123.0, None)


@pytest.mark.parametrize(
    "overrides",
    [
        {"rope_scaling": {"type": "yarn", "factor": 4.0}},
        {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
        {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
    ],
)
def test_unknown_rope_type_is_refused_naming_it(tmp_path: Path, overrides: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedModelError, match=r"rope_type '(yarn|dynamic|longrope)'.*llama3"):
        load_model_config(write(tmp_path, **overrides))


def test_scaling_without_factor_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"rope_scaling\.factor"):
        load_model_config(write(tmp_path, rope_scaling={"type": "linear"}))


def test_eos_ids_from_generation_config_int_list_or_config(tmp_path: Path) -> None:
    assert load_model_config(write(tmp_path, generation={"eos_token_id": 7})).eos_token_ids == (7,)
    assert load_model_config(write(tmp_path, generation={"eos_token_id": [7, 9, 7]})).eos_token_ids == (7, 9)
    assert load_model_config(write(tmp_path, generation={"bos_token_id": 1})).eos_token_ids == (2,)
    (tmp_path / "generation_config.json").unlink()
    assert load_model_config(write(tmp_path, eos_token_id=[3, 4])).eos_token_ids == (3, 4)


def test_invalid_generation_config_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"generation_config\.json"):
        load_model_config(write(tmp_path, generation="{not json"))


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model_config(tmp_path)


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(CheckpointError, match=r"config\.json.*invalid JSON"):
        load_model_config(tmp_path)


@pytest.mark.parametrize(
    "field", ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"]
)
def test_missing_required_field_is_named(tmp_path: Path, field: str) -> None:
    with pytest.raises(CheckpointError, match=rf"config\.json: field '{field}' is missing"):
        load_model_config(write(tmp_path, drop=(field,)))


def test_mistyped_field_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="'num_hidden_layers' must be a positive integer"):
        load_model_config(write(tmp_path, num_hidden_layers="2"))
    with pytest.raises(CheckpointError, match="'num_key_value_heads'"):
        load_model_config(write(tmp_path, num_key_value_heads=3))


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"'GPT2LMHeadModel'.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model_config(write(tmp_path, architectures=["GPT2LMHeadModel"]))


def test_architecture_falls_back_to_model_type(tmp_path: Path) -> None:
    cfg = load_model_config(write(tmp_path, drop=("architectures",), model_type="qwen2"))
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.attention_bias and not cfg.o_proj_bias


def test_mistral_sliding_window(tmp_path: Path) -> None:
    mistral: dict[str, Any] = {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    with pytest.raises(UnsupportedModelError, match=r"sliding_window=256"):
        load_model_config(write(tmp_path, **mistral, sliding_window=256))
    assert (
        load_model_config(write(tmp_path, **mistral, sliding_window=None)).architecture
        == "MistralForCausalLM"
    )
    assert (
        load_model_config(write(tmp_path, **mistral, sliding_window=1024)).architecture
        == "MistralForCausalLM"
    )


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_qwen_sliding_window_only_when_enabled(tmp_path: Path, arch: str) -> None:
    assert load_model_config(
        write(tmp_path, architectures=[arch], sliding_window=64, use_sliding_window=False)
    )
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        load_model_config(write(tmp_path, architectures=[arch], sliding_window=64, use_sliding_window=True))


def test_non_silu_activation_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu'"):
        load_model_config(write(tmp_path, hidden_act="gelu"))


def test_bad_dtype_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="'torch_dtype'"):
        load_model_config(write(tmp_path, torch_dtype="float8"))


def test_qwen3_and_llama_bias_flags(tmp_path: Path) -> None:
    cfg = load_model_config(write(tmp_path, architectures=["Qwen3ForCausalLM"], head_dim=8))
    assert cfg.qk_norm and cfg.head_dim == 8 and not cfg.attention_bias
    cfg = load_model_config(write(tmp_path, attention_bias=True, mlp_bias=True))
    assert cfg.attention_bias and cfg.o_proj_bias and cfg.mlp_bias and not cfg.qk_norm


def test_tiny_checkpoints_round_trip(checkpoints: dict[str, Path]) -> None:
    """What the builder wrote (transformers-5 config) is what kvloom reads back."""
    qwen3 = load_model_config(checkpoints["qwen3"])
    assert (qwen3.architecture, qwen3.num_heads, qwen3.num_kv_heads, qwen3.head_dim) == (
        "Qwen3ForCausalLM",
        6,
        2,
        8,
    )
    assert qwen3.qk_norm and qwen3.eos_token_ids == (1, 4)
    assert load_model_config(checkpoints["qwen2"]).attention_bias
    assert load_model_config(checkpoints["llama_tied"]).tie_word_embeddings
    scaled = load_model_config(checkpoints["llama_rope_llama3"])
    assert scaled.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64) and scaled.rope_theta == 500000.0
    assert load_model_config(checkpoints["llama_rope_linear"]).rope_scaling == RopeScaling("linear", 2.0)

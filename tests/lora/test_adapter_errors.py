"""Every adapter kvloom cannot serve exactly is refused with an AdapterError naming the field, file or key."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvloom.errors import AdapterError, InvalidRequestError
from kvloom.lora.adapter import load_peft_adapter
from kvloom.models.config import ModelConfig, load_model_config

_Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
_Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture
def good(tmp_path: Path, adapter_dir: Callable[..., Path]) -> Path:
    """A private copy of a valid llama adapter (q_proj, v_proj; r=4) to break."""
    return Path(shutil.copytree(adapter_dir("llama", r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                                tmp_path / "adapter"))


@pytest.fixture
def llama_config(base_dir: Callable[[str], Path]) -> ModelConfig:
    return load_model_config(base_dir("llama"))


def _edit_config(path: Path, **changes: Any) -> None:
    config_path = path / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data.update(changes)
    config_path.write_text(json.dumps(data))


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def _fails(path: Path, config: ModelConfig, *fragments: str, max_lora_rank: int = 16) -> None:
    with pytest.raises(AdapterError) as info:
        load_peft_adapter(path, config, max_lora_rank)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


CONFIG_ERRORS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "dora": ({"use_dora": True}, ("adapter_config.json", "use_dora=true", "DoRA")),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, ("adapter_config.json", "modules_to_save")),
    "bias_all": ({"bias": "all"}, ("adapter_config.json", 'bias="all"')),
    "bias_lora_only": ({"bias": "lora_only"}, ('bias="lora_only"',)),
    "lora_bias": ({"lora_bias": True}, ("lora_bias=true",)),
    "peft_type": ({"peft_type": "IA3"}, ('peft_type="IA3"',)),
    "alora": ({"alora_invocation_tokens": [1, 2]}, ("alora_invocation_tokens",)),
    "pissa_init": ({"init_lora_weights": "pissa"}, ('init_lora_weights="pissa"',)),
    "target_parameters": ({"target_parameters": ["experts.w"]}, ("target_parameters",)),
    "lm_head": ({"target_modules": ["q_proj", "lm_head"]}, ("target_modules", "lm_head")),
    "embed_tokens": ({"target_modules": ["embed_tokens"]}, ("target_modules", "model.embed_tokens")),
    "regex_lm_head": ({"target_modules": r".*(q_proj|lm_head)"}, ("target_modules", "lm_head")),
    "no_match": ({"target_modules": ["c_attn"]}, ("target_modules", "c_attn", "matches none")),
    "no_targets": ({"target_modules": None}, ("target_modules is missing",)),
    "bad_regex": ({"target_modules": "(unclosed"}, ("target_modules", "invalid regex")),
    "r_zero": ({"r": 0}, ("r must be a positive integer",)),
    "r_string": ({"r": "4"}, ("r must be a positive integer",)),
    "alpha_string": ({"lora_alpha": "x"}, ("lora_alpha",)),
    "rslora_string": ({"use_rslora": "yes"}, ("use_rslora",)),
    "rank_pattern_type": ({"rank_pattern": {"q_proj": 0}}, ("rank_pattern",)),
    "alpha_pattern_type": ({"alpha_pattern": {"q_proj": None}}, ("alpha_pattern",)),
    "layers_to_transform_type": ({"layers_to_transform": "0"}, ("layers_to_transform",)),
    # the config says rank 2, the tensors hold rank 4
    "rank_mismatch": ({"r": 2}, ("adapter_model.safetensors", _Q_A, "rank 4", "gives 2")),
    "rank_pattern_mismatch": ({"rank_pattern": {"v_proj": 3}}, ("v_proj.lora_A.weight", "gives 3")),
    # the config targets k_proj too, the file has no k_proj tensors
    "missing_module": ({"target_modules": ["q_proj", "k_proj", "v_proj"]},
                       ("missing tensor", "layers.0.self_attn.k_proj.lora_A.weight")),
    # the file has v_proj tensors the config doesn't target
    "untargeted_tensor": ({"target_modules": ["q_proj"]}, ("unexpected tensor", "v_proj", "target_modules")),
    "layers_to_transform": ({"layers_to_transform": [1]}, ("unexpected tensor", "layers.0.")),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_bad_config_field(case: str, good: Path, llama_config: ModelConfig) -> None:
    changes, fragments = CONFIG_ERRORS[case]
    _edit_config(good, **changes)
    _fails(good, llama_config, *fragments)


def test_rank_above_max_lora_rank(good: Path, llama_config: ModelConfig) -> None:
    _fails(good, llama_config, "adapter_config.json", "rank 4", "max_lora_rank=3", max_lora_rank=3)
    assert load_peft_adapter(good, llama_config, max_lora_rank=4).rank == 4


def test_adapter_error_is_an_invalid_request(good: Path, llama_config: ModelConfig) -> None:
    _edit_config(good, use_dora=True)
    with pytest.raises(InvalidRequestError):
        load_peft_adapter(good, llama_config, 16)


def test_missing_and_unreadable_files(good: Path, tmp_path: Path, llama_config: ModelConfig) -> None:
    _fails(tmp_path / "nowhere", llama_config, "nowhere", "not a directory")

    no_config = Path(shutil.copytree(good, tmp_path / "no_config"))
    (no_config / "adapter_config.json").unlink()
    _fails(no_config, llama_config, "adapter_config.json not found")

    no_weights = Path(shutil.copytree(good, tmp_path / "no_weights"))
    (no_weights / "adapter_model.safetensors").unlink()
    _fails(no_weights, llama_config, "adapter_model.safetensors not found")

    bin_only = Path(shutil.copytree(no_weights, tmp_path / "bin_only"))
    torch.save(load_file(good / "adapter_model.safetensors"), bin_only / "adapter_model.bin")
    _fails(bin_only, llama_config, "adapter_model.bin", "adapter_model.safetensors is required")

    (good / "adapter_config.json").write_text("{not json")
    _fails(good, llama_config, "adapter_config.json", "invalid JSON")
    (good / "adapter_config.json").write_text("[1, 2]")
    _fails(good, llama_config, "adapter_config.json", "expected a JSON object")


def test_truncated_or_garbage_safetensors(good: Path, llama_config: ModelConfig) -> None:
    weights = good / "adapter_model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) - 100])
    _fails(good, llama_config, "adapter_model.safetensors", "corrupt or truncated")
    weights.write_bytes(b"\x00" * 64)
    _fails(good, llama_config, "adapter_model.safetensors", "corrupt or truncated")


def test_wrong_base_model_shapes(good: Path, base_dir: Callable[[str], Path]) -> None:
    """A llama adapter (hidden 64) against the qwen2 base (hidden 48)."""
    _fails(good, load_model_config(base_dir("qwen2")), "adapter_model.safetensors", _Q_A, "[r, 48]")


def test_bad_tensors(good: Path, tmp_path: Path, llama_config: ModelConfig) -> None:
    def variant(name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
        path = Path(shutil.copytree(good, tmp_path / name))
        _edit_tensors(path, edit)
        return path

    def set_(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
        return lambda tensors: tensors.__setitem__(key, value)

    _fails(variant("b_shape", set_(_Q_B, torch.zeros(63, 4))), llama_config, _Q_B, "(63, 4)", "[64, 4]")
    _fails(variant("a_dim", set_(_Q_A, torch.zeros(4, 64, 1))), llama_config, _Q_A, "(4, 64, 1)")
    _fails(variant("missing_b", lambda t: t.pop(_Q_B)), llama_config, "missing tensor", "q_proj.lora_B.weight")
    _fails(variant("lm_head", set_("base_model.model.lm_head.lora_A.weight", torch.zeros(4, 64))),
           llama_config, "unexpected tensor", "lm_head.lora_A.weight")
    _fails(variant("dora_vector", set_(_Q_A.replace("lora_A.weight", "lora_magnitude_vector"), torch.ones(64))),
           llama_config, "unexpected tensor", "lora_magnitude_vector")
    _fails(variant("layer_5", set_(_Q_A.replace("layers.0", "layers.5"), torch.zeros(4, 64))),
           llama_config, "unexpected tensor", "layers.5", "2 layers")
    _fails(variant("duplicate", set_(_Q_A.replace("base_model.model.model.", "base_model.model."), torch.zeros(4, 64))),
           llama_config, "hold the same weight")
    _fails(variant("vision", set_("vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(4, 64))),
           llama_config, "unexpected tensor", "vision_tower")
    nan = torch.zeros(4, 64)
    nan[1, 2] = float("nan")
    _fails(variant("nan", set_(_Q_A, nan)), llama_config, _Q_A, "NaN")
    _fails(variant("int", set_(_Q_A, torch.zeros(4, 64, dtype=torch.int32))), llama_config, _Q_A, "dtype")


def test_half_precision_tensors_are_accepted(good: Path, llama_config: ModelConfig) -> None:
    reference = load_peft_adapter(good, llama_config, 16)
    _edit_tensors(good, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    adapter = load_peft_adapter(good, llama_config, 16)
    a, b = adapter.weights[(0, "q_proj")]
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, reference.weights[(0, "q_proj")][0], atol=1e-2, rtol=1e-2)

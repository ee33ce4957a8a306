"""Loading real checkpoint directories; every broken checkpoint fails naming the file and key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvloom.errors import CheckpointError, ConfigError, UnsupportedModelError
from kvloom.models.loader import load_model


@pytest.fixture
def llama_copy(checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    """A private, writable copy of the tiny llama checkpoint (unsharded)."""
    return Path(shutil.copytree(checkpoints["llama"], tmp_path / "llama"))


@pytest.fixture
def sharded_copy(sharded_llama: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(sharded_llama[1], tmp_path / "sharded"))


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*-of-*.safetensors"))


def _rewrite(path: Path, edit: Any) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_sharded_and_unsharded_load_bit_identical(
    sharded_llama: tuple[Path, Path], attn_backend: Any
) -> None:
    single, sharded = sharded_llama
    assert len(_shards(sharded)) > 1 and (sharded / "model.safetensors.index.json").is_file()
    # Dense weights (cpu_gemm="torch"): oneDNN-packed ones cannot be compared element-wise.
    model_a, _ = load_model(single, attn_backend=attn_backend, cpu_gemm="torch")
    model_b, _ = load_model(sharded, attn_backend=attn_backend, cpu_gemm="torch")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def test_fused_parameters_hold_the_checkpoint_tensors(
    checkpoints: dict[str, Path], attn_backend: Any
) -> None:
    path = checkpoints["qwen2"]
    model, config = load_model(path, attn_backend=attn_backend, cpu_gemm="torch")
    hf = load_file(path / "model.safetensors")
    params = dict(model.named_parameters())
    for kind in ("weight", "bias"):
        qkv = torch.cat([hf[f"model.layers.1.self_attn.{p}_proj.{kind}"] for p in "qkv"])
        assert torch.equal(params[f"model.layers.1.self_attn.qkv_proj.{kind}"], qkv)
    gate_up = torch.cat([hf[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(params["model.layers.0.mlp.gate_up_proj.weight"], gate_up)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params.values())
    assert config.torch_dtype == torch.float32


def test_dtype_choice(checkpoints: dict[str, Path], attn_backend: Any) -> None:
    model, config = load_model(checkpoints["llama"], attn_backend=attn_backend, dtype="bfloat16")
    assert config.torch_dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ConfigError, match=r"dtype.*'int8'"):
        load_model(checkpoints["llama"], attn_backend=attn_backend, dtype="int8")


def test_tied_checkpoint_with_lm_head_and_inv_freq_is_accepted(
    checkpoints: dict[str, Path], tmp_path: Path, attn_backend: Any
) -> None:
    """Older checkpoints store the tied lm_head and rotary inv_freq: both are harmless extras."""
    path = Path(shutil.copytree(checkpoints["llama_tied"], tmp_path / "tied"))

    def add(t: dict[str, torch.Tensor]) -> None:
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    _rewrite(path / "model.safetensors", add)
    model, _ = load_model(path, attn_backend=attn_backend)  # the names hold whatever the weights' layout
    assert model.expected_weight_names() == set(load_file(path / "model.safetensors")) - {
        "lm_head.weight",
        "model.layers.0.self_attn.rotary_emb.inv_freq",
    }


def test_no_weights_file(llama_copy: Path, attn_backend: Any) -> None:
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights found.*model\.safetensors"):
        load_model(llama_copy, attn_backend=attn_backend)


def test_index_naming_a_missing_shard(sharded_copy: Path, attn_backend: Any) -> None:
    victim = _shards(sharded_copy)[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"index\.json: shard '{victim.name}'.*missing"):
        load_model(sharded_copy, attn_backend=attn_backend)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_shard_names_the_file(sharded_copy: Path, attn_backend: Any, damage: str) -> None:
    victim = _shards(sharded_copy)[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\xff" * 64 + data[64:])
    with pytest.raises(CheckpointError, match=rf"{victim.name}: corrupt or truncated safetensors file"):
        load_model(sharded_copy, attn_backend=attn_backend)


def test_shape_mismatch_names_key_and_file(llama_copy: Path, attn_backend: Any) -> None:
    _edit_config(llama_copy, intermediate_size=96)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: weight 'model\.layers\.\d\.mlp\.\w+_proj\.weight' has shape",
    ):
        load_model(llama_copy, attn_backend=attn_backend)


def test_missing_key_is_named(llama_copy: Path, attn_backend: Any) -> None:
    _rewrite(llama_copy / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing weight 'model\.layers\.1\.self_attn\.k_proj\.weight'"
    ):
        load_model(llama_copy, attn_backend=attn_backend)


def test_missing_untied_lm_head_is_named(llama_copy: Path, attn_backend: Any) -> None:
    _rewrite(llama_copy / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing weight 'lm_head\.weight'"):
        load_model(llama_copy, attn_backend=attn_backend)


def test_unexpected_key_names_key_and_file(sharded_copy: Path, attn_backend: Any) -> None:
    victim = _shards(sharded_copy)[0]
    _rewrite(victim, lambda t: t.__setitem__("model.layers.0.self_attn.extra_proj.weight", torch.zeros(2)))
    with pytest.raises(
        CheckpointError,
        match=rf"{victim.name}: unexpected weight 'model\.layers\.0\.self_attn\.extra_proj\.weight'",
    ):
        load_model(sharded_copy, attn_backend=attn_backend)


def test_tensor_in_two_shards_is_refused(sharded_copy: Path, attn_backend: Any) -> None:
    first, second = _shards(sharded_copy)[:2]
    name, tensor = next(iter(load_file(first).items()))
    _rewrite(second, lambda t: t.__setitem__(name, tensor))
    with pytest.raises(CheckpointError, match=rf"'{name}' appears more than once"):
        load_model(sharded_copy, attn_backend=attn_backend)


@pytest.mark.parametrize(
    ("changes", "error", "pattern"),
    [
        (
            {"architectures": ["GPTNeoXForCausalLM"]},
            UnsupportedModelError,
            r"'GPTNeoXForCausalLM'.*supported: .*LlamaForCausalLM",
        ),
        (
            {"architectures": ["MistralForCausalLM"], "sliding_window": 128},
            UnsupportedModelError,
            "sliding_window",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            UnsupportedModelError,
            "rope_type 'yarn'",
        ),
        ({"num_hidden_layers": None}, CheckpointError, "'num_hidden_layers' is missing"),
    ],
    ids=["arch", "sliding_window", "rope_type", "missing_field"],
)
def test_config_refusals_surface_through_load_model(
    llama_copy: Path, attn_backend: Any, changes: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    _edit_config(llama_copy, **changes)
    with pytest.raises(error, match=pattern):
        load_model(llama_copy, attn_backend=attn_backend)

"""load_peft_adapter reads what PEFT reads: the same modules, ranks and (folded) scales, per pattern."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvloom.lora.adapter import load_peft_adapter
from kvloom.models.config import load_model_config
from tests.lora.conftest import ALL_MODULES
from tests.lora.peft_helpers import load_hf_with_adapter, make_peft_adapter

_LAYER_ONE_K_UP = r".*\.layers\.1\.(self_attn\.k_proj|mlp\.up_proj)"

SPECS: dict[str, dict[str, Any]] = {
    "all_modules": dict(r=8, alpha=16, target_modules=ALL_MODULES),
    "patterns": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                     alpha_pattern={"layers.1.self_attn.q_proj": 3}),
    "rslora": dict(r=16, alpha=8, target_modules=["o_proj", "down_proj", "gate_proj"], use_rslora=True),
    "rslora_patterns": dict(r=4, alpha=4, target_modules=["k_proj", "o_proj", "down_proj"], use_rslora=True,
                            rank_pattern={"down_proj": 6}, alpha_pattern={"o_proj": 2.5}),
    "all_linear": dict(r=2, alpha=4, target_modules="all-linear"),
    "regex": dict(r=4, alpha=4, target_modules=_LAYER_ONE_K_UP),
    "layers_to_transform": dict(r=4, alpha=2, target_modules=["q_proj", "up_proj"], layers_to_transform=[0]),
    "layers_pattern": dict(r=2, alpha=2, target_modules=["v_proj", "o_proj"], layers_to_transform=[1],
                           layers_pattern="layers"),
    "exclude_modules": dict(r=2, alpha=2, target_modules=["q_proj", "down_proj"],
                            exclude_modules=["layers.0.mlp.down_proj"]),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_weights_ranks_and_scales_match_peft(
    arch: str, spec: str, base_dir: Callable[[str], Path], adapter_dir: Callable[..., Path]
) -> None:
    path = adapter_dir(arch, **SPECS[spec])
    adapter = load_peft_adapter(path, load_model_config(base_dir(arch)), max_lora_rank=16)

    peft_model = load_hf_with_adapter(base_dir(arch), path)
    expected: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            layer = int(name.split(".layers.")[1].split(".")[0])
            a = module.lora_A["default"].weight
            b = module.lora_B["default"].weight * module.scaling["default"]
            expected[(layer, name.rsplit(".", 1)[1])] = (a, b)

    assert set(adapter.weights) == set(expected)
    for key, (a, b) in expected.items():
        torch.testing.assert_close(adapter.weights[key][0], a, rtol=0, atol=0, msg=f"A of {key}")
        torch.testing.assert_close(adapter.weights[key][1], b, rtol=1e-6, atol=0, msg=f"scaled B of {key}")
        assert adapter.weights[key][0].dtype == torch.float32 and adapter.weights[key][0].device.type == "cpu"
    assert adapter.rank == max(a.shape[0] for a, _ in expected.values())
    assert adapter.path == path


def test_patterns_and_rslora_give_the_documented_scales(
    base_dir: Callable[[str], Path], adapter_dir: Callable[..., Path]
) -> None:
    """Spot-check the arithmetic, independent of PEFT: B_folded / B_saved = alpha / r or alpha / sqrt(r)."""
    from safetensors.torch import load_file

    config = load_model_config(base_dir("llama"))
    cases = {"patterns": {(0, "q_proj"): 8 / 4, (1, "q_proj"): 3 / 4, (0, "v_proj"): 8 / 2},
             "rslora_patterns": {(0, "k_proj"): 4 / 2, (0, "o_proj"): 2.5 / 2, (1, "down_proj"): 4 / 6**0.5},
             "rslora": {(1, "gate_proj"): 8 / 4}}
    for spec, scales in cases.items():
        path = adapter_dir("llama", **SPECS[spec])
        saved = load_file(path / "adapter_model.safetensors")
        adapter = load_peft_adapter(path, config, max_lora_rank=16)
        for (layer, module), scale in scales.items():
            parent = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            raw_b = saved[f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_B.weight"]
            torch.testing.assert_close(adapter.weights[(layer, module)][1], raw_b * scale, msg=f"{spec} {module}")
    assert load_peft_adapter(adapter_dir("llama", **SPECS["rslora_patterns"]), config, 16).rank == 6


def test_subsets_of_target_modules(base_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """Any subset of the seven projections loads, with exactly those modules in every layer."""
    base = base_dir("llama")
    config = load_model_config(base)
    for i, modules in enumerate([["gate_proj"], ["k_proj", "down_proj"], ["v_proj", "o_proj", "up_proj"]]):
        adapter = load_peft_adapter(make_peft_adapter(base, tmp_path / str(i), r=2, alpha=2,
                                                      target_modules=modules), config, 16)
        assert set(adapter.weights) == {(layer, m) for layer in range(config.num_layers) for m in modules}


def test_content_hash_follows_the_files(base_dir: Callable[[str], Path], tmp_path: Path) -> None:
    base = base_dir("llama")
    config = load_model_config(base)
    path = make_peft_adapter(base, tmp_path / "a", r=4, alpha=4, target_modules=["q_proj"], seed=1)
    first = load_peft_adapter(path, config, 16)
    assert load_peft_adapter(path, config, 16).content_hash == first.content_hash
    assert load_peft_adapter(shutil.copytree(path, tmp_path / "copy"), config, 16).content_hash == first.content_hash

    make_peft_adapter(base, path, r=4, alpha=4, target_modules=["q_proj"], seed=2)  # new weights, same name
    reloaded = load_peft_adapter(path, config, 16)
    assert reloaded.content_hash != first.content_hash
    assert not torch.equal(reloaded.weights[(0, "q_proj")][0], first.weights[(0, "q_proj")][0])

    data = json.loads((path / "adapter_config.json").read_text())
    data["lora_alpha"] = 8  # same tensors, twice the scale
    (path / "adapter_config.json").write_text(json.dumps(data))
    rescaled = load_peft_adapter(path, config, 16)
    assert rescaled.content_hash != reloaded.content_hash
    torch.testing.assert_close(rescaled.weights[(0, "q_proj")][1], 2 * reloaded.weights[(0, "q_proj")][1])

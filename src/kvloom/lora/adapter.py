"""Read a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``) into host tensors.

Everything slow happens here, once per ``load_adapter``: file I/O, parsing, shape checks,
hashing, folding the scale into B. What comes out (``LoRAAdapter``) is ready to be copied
into a device slot with no further work. Nothing that would make the served adapter differ
from PEFT's is accepted silently: see ``peft_config`` for the refused fields; here a missing
or corrupt file, a tensor for a module the config doesn't target (or the reverse), a shape
that doesn't fit the base model, or a rank above ``max_lora_rank`` is an ``AdapterError``
naming the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from kvloom.errors import AdapterError
from kvloom.lora.peft_config import (
    LORA_MODULES,
    MODULE_PARENT,
    PeftLoRAConfig,
    hf_module_name,
    parse_lora_config,
)
from kvloom.models.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_BIN_FILE = "adapter_model.bin"
# PEFT saves ``base_model.model.`` + the HF module name + ``.lora_A.weight`` (adapter name dropped);
# an adapter trained on the headless ``LlamaModel`` lacks the inner ``model.``.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")

LoRAWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
"""(layer, HF projection) -> (A ``[r, in]``, scale * B ``[out, r]``), float32 on the CPU."""


@dataclass(frozen=True, slots=True, eq=False)
class LoRAAdapter:
    """A checked LoRA adapter in host memory. Immutable: reloading a name makes a new one.

    Invariants: every ``weights`` key is a projection the config targets, and every targeted
    projection has a key; A is ``[r, in_features]``, B ``[out_features, r]`` for the base
    model's projection, with ``1 <= r <= rank <= max_lora_rank``; B already holds the scale.
    """

    path: Path
    content_hash: str
    """sha256 hex over the config and weight file bytes: new weights, new hash."""
    rank: int
    """Largest rank over its modules."""
    weights: LoRAWeights = field(repr=False)
    """(layer, HF projection name in ``LORA_MODULES``) -> (A ``[r, in]``, B ``[out, r]``) float32, CPU."""


def projection_shape(config: ModelConfig, module: str) -> tuple[int, int]:
    """(in_features, out_features) of HF projection ``module`` in the base model."""
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (hidden, q_size), "k_proj": (hidden, kv_size), "v_proj": (hidden, kv_size),
        "o_proj": (q_size, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }[module]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise AdapterError(f"{path}: cannot read file ({e.strerror or e})") from e


def _files(path: Path) -> tuple[Path, Path]:
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory (expected a PEFT adapter directory)")
    config, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config.is_file():
        raise AdapterError(f"{config}: {CONFIG_FILE} not found in {path}")
    if not weights.is_file():
        if (path / _BIN_FILE).is_file():
            raise AdapterError(
                f"{path / _BIN_FILE}: pickled weights are not supported, {WEIGHTS_FILE} is required "
                "(re-save with save_pretrained(..., safe_serialization=True))")
        raise AdapterError(f"{weights}: {WEIGHTS_FILE} not found in {path}")
    return config, weights


def _parse_config(raw: bytes, path: Path) -> PeftLoRAConfig:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return parse_lora_config(data, path)


def _parse_tensors(raw: bytes, path: Path) -> dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]]:
    """(layer, projection) -> {"A"|"B": (key, tensor)}; any other key is an error naming it."""
    try:
        tensors = load_safetensors(raw)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{path}: corrupt or truncated safetensors file ({e})") from e
    found: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        module = match.group(3) if match else ""
        if match is None or module not in LORA_MODULES or MODULE_PARENT[module] != match.group(2):
            raise AdapterError(
                f"{path}: unexpected tensor '{key}' (only lora_A/lora_B weights of "
                f"{', '.join(LORA_MODULES)} are supported)")
        if not tensor.is_floating_point():
            raise AdapterError(f"{path}: tensor '{key}' has dtype {tensor.dtype}, expected a float dtype")
        pair = found.setdefault((int(match.group(1)), module), {})
        if match.group(4) in pair:
            raise AdapterError(f"{path}: tensors '{pair[match.group(4)][0]}' and '{key}' hold the same weight")
        pair[match.group(4)] = (key, tensor)
    return found


def _check_pair(path: Path, pair: dict[str, tuple[str, torch.Tensor]], shape: tuple[int, int],
                rank: int, max_lora_rank: int, config_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) float32 after checking shapes, the configured rank and finiteness."""
    (key_a, a), (key_b, b) = pair["A"], pair["B"]
    in_features, out_features = shape
    if a.dim() != 2 or a.shape[1] != in_features:
        raise AdapterError(f"{path}: tensor '{key_a}' has shape {tuple(a.shape)}, the base model needs "
                           f"[r, {in_features}]")
    if b.dim() != 2 or tuple(b.shape) != (out_features, a.shape[0]):
        raise AdapterError(f"{path}: tensor '{key_b}' has shape {tuple(b.shape)}, the base model and "
                           f"'{key_a}' need [{out_features}, {a.shape[0]}]")
    if a.shape[0] != rank:
        raise AdapterError(f"{path}: tensor '{key_a}' has rank {a.shape[0]}, {config_path.name} "
                           f"(r/rank_pattern) gives {rank}")
    if rank > max_lora_rank:
        raise AdapterError(f"{config_path}: r/rank_pattern gives rank {rank} for '{key_a}', above "
                           f"max_lora_rank={max_lora_rank}")
    for key, tensor in ((key_a, a), (key_b, b)):
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{path}: tensor '{key}' holds NaN or infinite values")
    return a.float(), b.float()


def load_peft_adapter(path: str | Path, model_config: ModelConfig, max_lora_rank: int) -> LoRAAdapter:
    """Read and check a PEFT LoRA directory for a base model with ``model_config``.

    Slow (file I/O, hashing): call it off the event loop and off the engine step. Raises
    ``AdapterError`` naming the file, field or key for a missing or corrupt file, an
    unsupported PEFT feature, a shape that doesn't fit the base model, or a rank above
    ``max_lora_rank``. B is returned pre-multiplied by its module's scale.
    """
    path = Path(path)
    config_path, weights_path = _files(path)
    config_raw, weights_raw = _read(config_path), _read(weights_path)
    config = _parse_config(config_raw, config_path)
    targets = config.targets(model_config.num_layers)
    found = _parse_tensors(weights_raw, weights_path)

    extra = sorted(set(found) - set(targets))
    if extra:
        layer, module = extra[0]
        key = next(iter(found[extra[0]].values()))[0]
        why = (f"the base model has {model_config.num_layers} layers" if layer >= model_config.num_layers
               else f"{CONFIG_FILE} target_modules does not target {hf_module_name(layer, module)}")
        raise AdapterError(f"{weights_path}: unexpected tensor '{key}' ({why})")
    weights: LoRAWeights = {}
    for layer, module in targets:
        pair = found.get((layer, module), {})
        for side in ("A", "B"):
            if side not in pair:
                raise AdapterError(f"{weights_path}: missing tensor "
                                   f"'base_model.model.{hf_module_name(layer, module)}.lora_{side}.weight'")
        rank, scale = config.rank_and_scale(layer, module)
        a, b = _check_pair(weights_path, pair, projection_shape(model_config, module), rank,
                           max_lora_rank, config_path)
        weights[(layer, module)] = (a.contiguous(), (b * scale).contiguous())

    digest = hashlib.sha256()
    for name, raw in ((CONFIG_FILE, config_raw), (WEIGHTS_FILE, weights_raw)):
        digest.update(f"{name}:{len(raw)}:".encode())
        digest.update(raw)
    return LoRAAdapter(path=path, content_hash=digest.hexdigest(),
                       rank=max(a.shape[0] for a, _ in weights.values()), weights=weights)

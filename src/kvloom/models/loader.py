"""Load a HF checkpoint directory (config.json + safetensors, sharded or not) into a kvloom model.

Tensors are streamed from memory-mapped safetensors files (``safe_open``) one at a time into
the model's preallocated parameters, so peak host memory stays near one tensor. After
loading, every parameter must have been filled exactly once: missing, unexpected,
duplicated or misshapen tensors are ``CheckpointError``s naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from kvloom.errors import CheckpointError
from kvloom.layers.weight_layout import CpuGemm, Quantization, WeightLayout, apply_layout, choose_layout
from kvloom.models.config import ModelConfig, load_model_config
from kvloom.models.dtype_choice import choose_dtype
from kvloom.models.registry import CausalLM, get_model_class

if TYPE_CHECKING:
    from kvloom.layers.attention import AttentionBackend

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def resolve_dtype(dtype: str, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to run in (``kvloom.models.dtype_choice.choose_dtype``, which also says why)."""
    return choose_dtype(dtype, checkpoint_dtype, device).dtype


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files to read, in order. The index (sharded) wins over a single file."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index_path}: invalid index file ({e})") from e
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: field 'weight_map' is missing or empty")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (model_dir / shard).is_file():
                names = sorted(k for k, v in weight_map.items() if v == shard)
                raise CheckpointError(
                    f"{index_path}: shard '{shard}' (holding e.g. '{names[0]}') is missing from {model_dir}"
                )
        return [model_dir / shard for shard in shards]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise CheckpointError(f"{model_dir}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})")


class _WeightStream:
    """Iterates ``(name, tensor)`` over files; remembers the file being read for error messages."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.current: Path | None = None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for path in self.files:
            self.current = path
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e
            with handle as f:
                for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    try:
                        tensor = f.get_tensor(name)
                    except (SafetensorError, OSError) as e:
                        raise CheckpointError(f"{path}: cannot read tensor '{name}' ({e})") from e
                    yield name, tensor


def load_weights_into(model: CausalLM, model_dir: Path) -> None:
    """Stream every tensor of ``model_dir`` into ``model`` and check it is now complete."""
    stream = _WeightStream(weight_files(model_dir))
    try:
        loaded = model.load_weights(stream)
    except CheckpointError as e:
        if stream.current is None or str(stream.current) in str(e):
            raise
        raise CheckpointError(f"{stream.current}: {e}") from e
    missing = sorted(model.expected_weight_names() - loaded)
    if missing:
        shown = ", ".join(f"'{name}'" for name in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{model_dir}: missing weight {shown}{more}")


def load_model(
    model_dir: str | Path,
    *,
    attn_backend: AttentionBackend,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    cpu_gemm: CpuGemm = "auto",
    quantization: Quantization | None = None,
) -> tuple[CausalLM, ModelConfig]:
    """Build the model for ``model_dir`` on ``device`` and load its weights.

    Returns ``(model, config)`` where ``config.torch_dtype`` is the dtype the model runs in
    (``resolve_dtype``). Parameters are allocated directly on ``device`` in that dtype, with
    no random init. Linear weights then take the layout ``layers.weight_layout.choose_layout``
    picks (``cpu_gemm``, ``quantization``: int8 weights untie the LM head from the embedding first),
    kept as ``model.weight_layout``. The model is in eval mode and holds
    no autograd state.
    """
    model_dir = Path(model_dir)
    config = load_model_config(model_dir)
    device = torch.device(device)
    config = dataclasses.replace(config, torch_dtype=resolve_dtype(dtype, config.torch_dtype, device))
    model_cls = get_model_class(config.architecture)
    with torch.device(device):
        model = model_cls(config, attn_backend)
    load_weights_into(model, model_dir)
    layout: WeightLayout = choose_layout(cpu_gemm, device, config.torch_dtype, quantization=quantization)
    if layout.name == "int8":
        model.untie_lm_head()
    apply_layout(model, layout)
    model.weight_layout = layout
    model.eval()
    return model, config

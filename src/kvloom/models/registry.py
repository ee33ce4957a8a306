"""The model interface and the registry: architecture name -> model class, imported lazily.

The architecture name is ``config.json``'s ``architectures[0]``; the table is
``architectures.MODEL_CLASSES``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from kvloom.errors import UnsupportedModelError
from kvloom.models.architectures import MODEL_CLASSES

if TYPE_CHECKING:
    from kvloom.layers.attention import AttentionBackend
    from kvloom.layers.attention_metadata import AttentionMetadata
    from kvloom.layers.weight_layout import WeightLayout
    from kvloom.models.config import ModelConfig


class CausalLM(nn.Module, ABC):
    """What the loader and the runner rely on. Subclasses own their parameters' layout.

    Construction allocates uninitialised parameters in ``config.torch_dtype`` on the default
    device (construct under ``with torch.device(...)``); ``load_weights`` fills them.
    """

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.weight_layout: WeightLayout | None = None
        """How the loader laid out the Linear weights (``layers.weight_layout``); None before loading."""

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids/positions ``[T]`` int64 (flattened batch) -> final hidden states ``[T, hidden]``."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[N, hidden]`` -> ``[N, vocab_size]`` float32."""

    def untie_lm_head(self) -> None:
        """Give a model whose LM head is its embedding matrix a separate head layer (same values), so the
        head can be quantized while lookups stay float. A no-op for a model with its own head."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors; returns the names loaded. Raises ``CheckpointError`` on a bad one."""

    @abstractmethod
    def expected_weight_names(self) -> set[str]:
        """Every HF name ``load_weights`` must see for the model to be complete."""


def get_model_class(architecture: str) -> type[CausalLM]:
    """The class implementing ``architecture``; ``UnsupportedModelError`` lists the supported ones."""
    if architecture not in MODEL_CLASSES:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(MODEL_CLASSES)}"
        )
    module_name, class_name = MODEL_CLASSES[architecture]
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, CausalLM)):
        raise TypeError(f"{module_name}.{class_name} is not a CausalLM")
    return cls

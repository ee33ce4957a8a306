"""``adapter_config.json`` of a PEFT LoRA adapter: what kvloom reads and what it refuses.

kvloom serves plain LoRA (``y = W x + scale * B A x``) on the seven projections of a
Llama-family decoder layer. Anything that changes that forward (DoRA and the other LoRA
variants, LoRA biases, fully trained ``modules_to_save``, adapters on the embeddings or the LM
head, inits that rewrite the base weights) is refused with an ``AdapterError`` that names the
field, rather than served wrong.

Which modules an adapter targets, and each module's rank and alpha, follow PEFT's own
matching rules (``peft.tuners.tuners_utils.check_target_module_exists`` and
``peft.utils.other.get_pattern_key``), applied to the HF module names of the base model
(``model.layers.{i}.self_attn.q_proj`` ...).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvloom.errors import AdapterError

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The HF projections an adapter may target, in layer order."""
MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
"""HF projection -> the submodule of a decoder layer that holds it."""
# HF modules outside the decoder layers that a LoRA config could name; we refuse them.
_UNSUPPORTED_TARGETS = ("model.embed_tokens", "lm_head")
# Fields that switch on a LoRA variant with a different forward (PEFT's ``lora_variants``).
_VARIANT_FIELDS = {
    "use_dora": "DoRA", "arrow_config": "Arrow routing", "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA", "use_qalora": "QA-LoRA",
}
# init_lora_weights values whose adapters only work on a base model that the init rewrote.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


def hf_module_name(layer: int, module: str) -> str:
    """The HF (transformers) name of projection ``module`` of decoder layer ``layer``."""
    return f"model.layers.{layer}.{MODULE_PARENT[module]}.{module}"


@dataclass(frozen=True, slots=True)
class PeftLoRAConfig:
    """The parts of ``adapter_config.json`` that decide which modules are adapted and how strongly."""

    path: Path
    """The ``adapter_config.json`` file (for error messages)."""
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    """Regex key -> rank; the first key matching a module's name (PEFT's rule) wins."""
    alpha_pattern: dict[str, float]
    target_modules: frozenset[str] | str
    """Names (exact, or a ``.``-separated suffix) or one regex (full match); ``all-linear`` is resolved."""
    exclude_modules: frozenset[str] | str | None
    layers_to_transform: tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None

    def is_targeted(self, key: str) -> bool:
        """Does PEFT put a LoRA layer on the module named ``key``? (``check_target_module_exists``)"""
        exclude = self.exclude_modules
        if exclude and (re.fullmatch(exclude, key) if isinstance(exclude, str)
                        else key in exclude or any(key.endswith(f".{e}") for e in exclude)):
            return False
        targets = self.target_modules
        if isinstance(targets, str):
            return re.fullmatch(targets, key) is not None
        if key in targets:
            return True
        if not any(key.endswith(f".{t}") for t in targets):
            return False
        if not self.layers_to_transform:
            return True
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            match = None
            for pattern in self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        return match is not None and int(match.group("idx")) in self.layers_to_transform

    def targets(self, num_layers: int) -> list[tuple[int, str]]:
        """(layer, HF projection) pairs the adapter targets, in layer order.

        Raises ``AdapterError`` when it targets the embeddings or the LM head, or nothing at all.
        """
        try:
            for name in _UNSUPPORTED_TARGETS:
                if self.is_targeted(name):
                    raise AdapterError(
                        f"{self.path}: target_modules targets '{name}'; only the projections "
                        f"{', '.join(LORA_MODULES)} are supported")
            found = [(layer, module) for layer in range(num_layers) for module in LORA_MODULES
                     if self.is_targeted(hf_module_name(layer, module))]
        except re.error as e:
            raise AdapterError(f"{self.path}: target_modules/exclude_modules/layers_pattern: invalid regex ({e})") from e
        if not found:
            raise AdapterError(
                f"{self.path}: target_modules {_show(self.target_modules)} matches none of this model's "
                f"projections ({', '.join(LORA_MODULES)} of {num_layers} layers)")
        return found

    def rank_and_scale(self, layer: int, module: str) -> tuple[int, float]:
        """The (rank, scale) PEFT gives this module: patterns first, then ``r``/``lora_alpha``.

        ``scale = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
        """
        key = hf_module_name(layer, module)
        try:
            r = self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r)
            alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, key), self.lora_alpha)
        except re.error as e:
            raise AdapterError(f"{self.path}: rank_pattern/alpha_pattern: invalid regex ({e})") from e
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


def _pattern_key(patterns: dict[str, Any], key: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern that matches a ``.``-suffix of ``key``."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def _json(value: object) -> str:
    """A config value as it is written in the JSON file (``true``, ``"all"``)."""
    return json.dumps(value)


def _show(value: object) -> str:
    return repr(sorted(value)) if isinstance(value, frozenset) else repr(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _str_set(data: dict[str, Any], field: str, path: Path, allow_str: bool) -> frozenset[str] | str | None:
    value = data.get(field)
    if value is None or (allow_str and isinstance(value, str)):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise AdapterError(f"{path}: {field} must be a list of module names{' or a regex' if allow_str else ''}, "
                       f"got {value!r}")


def _refuse_unsupported(data: dict[str, Any], path: Path) -> None:
    """Every field that would make PEFT's forward differ from plain LoRA."""
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type={_json(peft_type)} is not supported (only LORA adapters)")
    for field, what in _VARIANT_FIELDS.items():
        if data.get(field):
            raise AdapterError(f"{path}: {field}={_json(data[field])} ({what}) is not supported")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterError(f"{path}: init_lora_weights={_json(init)} is not supported: it rewrites the base weights "
                           "(save the adapter with path_initial_model_for_weight_conversion)")
    if data.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save={_json(data['modules_to_save'])} is not supported "
                           "(fully trained modules replace base weights)")
    if data.get("bias", "none") not in ("none", None):
        raise AdapterError(f"{path}: bias={_json(data['bias'])} is not supported (only \"none\")")
    if data.get("lora_bias"):
        raise AdapterError(f"{path}: lora_bias=true is not supported")
    for field in ("target_parameters", "layer_replication", "trainable_token_indices"):
        if data.get(field):
            raise AdapterError(f"{path}: {field}={_json(data[field])} is not supported")


def parse_lora_config(data: dict[str, Any], path: Path) -> PeftLoRAConfig:
    """Validate a parsed ``adapter_config.json`` (``path`` is only for messages).

    Raises ``AdapterError`` naming the field for an unsupported feature or a mistyped value.
    """
    _refuse_unsupported(data, path)
    r = data.get("r", 8)
    if not _is_int(r) or r <= 0:
        raise AdapterError(f"{path}: r must be a positive integer, got {r!r}")
    alpha = data.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise AdapterError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    use_rslora = data.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterError(f"{path}: use_rslora must be true or false, got {use_rslora!r}")
    rank_pattern = data.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(_is_int(v) and v > 0 for v in rank_pattern.values()):
        raise AdapterError(f"{path}: rank_pattern must map module patterns to positive ranks, got {rank_pattern!r}")
    alpha_pattern = data.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict) or not all(_is_number(v) for v in alpha_pattern.values()):
        raise AdapterError(f"{path}: alpha_pattern must map module patterns to numbers, got {alpha_pattern!r}")
    targets = _str_set(data, "target_modules", path, allow_str=True)
    if targets is None:
        raise AdapterError(f"{path}: target_modules is missing")
    if isinstance(targets, str) and targets.lower() == "all-linear":
        # PEFT: every nn.Linear but the output layer, i.e. the seven projections of every layer.
        targets = frozenset(LORA_MODULES)
    layers = data.get("layers_to_transform")
    if _is_int(layers):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(_is_int(v) for v in layers)):
        raise AdapterError(f"{path}: layers_to_transform must be a layer index or a list of them, got {layers!r}")
    pattern = data.get("layers_pattern")
    if isinstance(pattern, str):
        pattern = [pattern]
    if pattern is not None and not (isinstance(pattern, list) and all(isinstance(v, str) for v in pattern)):
        raise AdapterError(f"{path}: layers_pattern must be a name or a list of names, got {pattern!r}")
    return PeftLoRAConfig(
        path=path, r=r, lora_alpha=float(alpha), use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern), alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        target_modules=targets, exclude_modules=_str_set(data, "exclude_modules", path, allow_str=True),
        layers_to_transform=tuple(layers) if layers is not None else None,
        layers_pattern=tuple(pattern) if pattern is not None else None,
    )

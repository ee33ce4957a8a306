"""The architectures kvloom runs: ``config.json``'s ``architectures[0]`` -> the class implementing it.

No kvloom imports: ``config`` (which refuses any other architecture when it reads a checkpoint)
and ``registry`` (which imports the class) both read this one table, and neither imports the other.
"""

from __future__ import annotations

MODEL_CLASSES: dict[str, tuple[str, str]] = {
    # architecture -> (module, class name); all four share one implementation.
    "LlamaForCausalLM": ("kvloom.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("kvloom.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("kvloom.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("kvloom.models.llama", "LlamaForCausalLM"),
}


def supported_architectures() -> tuple[str, ...]:
    return tuple(MODEL_CLASSES)

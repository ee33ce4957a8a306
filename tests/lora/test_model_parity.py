"""One forward, many adapters: each sequence's logits equal transformers + PEFT with its adapter (or the base model).

The batch mixes sequences on different slots and on the base model, prefill and decode, and a
chunked prefill; adapters differ in target modules, ranks (rank_pattern, zero-padded to R),
alpha_pattern and rsLoRA. Each adapter visibly changes the logits, so matching is not vacuous.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvloom.layers.attention import TorchAttentionBackend
from kvloom.lora.adapter import LoRAAdapter, load_peft_adapter
from kvloom.lora.mapping import LoRAMapping
from kvloom.lora.slots import LoRASlots
from kvloom.models.loader import load_model
from kvloom.models.registry import CausalLM
from tests.lora.conftest import ALL_MODULES
from tests.lora.peft_helpers import hf_logits, load_hf, load_hf_with_adapter
from tests.models.conftest import PagedKV

ATOL = 1e-4

ADAPTERS: dict[str, dict[str, Any]] = {
    "full": dict(r=8, alpha=16, target_modules=ALL_MODULES, seed=1),
    "attn_patterns": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                          alpha_pattern={"layers.1.self_attn.q_proj": 3}, seed=2),
    "mlp_rslora": dict(r=16, alpha=8, target_modules=["o_proj", "gate_proj", "down_proj"], use_rslora=True, seed=3),
    "regex_k_up": dict(r=2, alpha=4, target_modules=r".*\.layers\.1\.(self_attn\.k_proj|mlp\.up_proj)", seed=4),
}


class Reference:
    """transformers (+ PEFT) models for one base checkpoint, loaded once per adapter."""

    def __init__(self, base: Path, adapter_dirs: dict[str, Path]) -> None:
        self.base, self.adapter_dirs = base, adapter_dirs
        self.models: dict[str | None, Any] = {}

    def logits(self, adapter: str | None, tokens: list[int]) -> torch.Tensor:
        if adapter not in self.models:
            self.models[adapter] = (load_hf(self.base) if adapter is None
                                    else load_hf_with_adapter(self.base, self.adapter_dirs[adapter]))
        return hf_logits(self.models[adapter], tokens)


def _setup(arch: str, base_dir: Callable[[str], Path], adapter_dir: Callable[..., Path]
           ) -> tuple[CausalLM, dict[str, LoRAAdapter], Reference]:
    base = base_dir(arch)
    model, config = load_model(base, attn_backend=TorchAttentionBackend())
    dirs = {name: adapter_dir(arch, **spec) for name, spec in ADAPTERS.items()}
    adapters = {name: load_peft_adapter(path, config, max_lora_rank=16) for name, path in dirs.items()}
    return model, adapters, Reference(base, dirs)


@torch.no_grad()
def _step(model: CausalLM, slots: LoRASlots, kv: PagedKV, new_tokens: dict[int, list[int]],
          seq_slots: dict[int, int]) -> list[torch.Tensor]:
    """One forward; each scheduled sequence's logits ``[num_new, vocab]`` in schedule order."""
    input_ids, positions, meta = kv.step(new_tokens)
    slots.set_mapping(LoRAMapping.from_request_slots([seq_slots[s] for s in new_tokens],
                                                     [len(t) for t in new_tokens.values()]))
    logits = model.compute_logits(model(input_ids, positions, kv.kv_caches, meta))
    qsl = meta.query_start_loc_cpu
    return [logits[qsl[i]:qsl[i + 1]] for i in range(len(new_tokens))]


def _close(mine: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (mine - ref).abs().max().item()
    assert err <= ATOL, f"{what}: max |kvloom - transformers+PEFT| = {err:.2e} > {ATOL}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_mixed_adapter_batch_matches_peft(
    arch: str, base_dir: Callable[[str], Path], adapter_dir: Callable[..., Path]
) -> None:
    model, adapters, ref = _setup(arch, base_dir, adapter_dir)
    slots = LoRASlots(model, max_loras=4, max_lora_rank=16)
    # Activation order differs from first use, so slot ids differ from adapter order.
    slot_of = slots.activate(["regex_k_up", "mlp_rslora", "full", "attn_patterns"], adapters)
    uses: list[str | None] = ["full", None, "attn_patterns", "mlp_rslora", "full", "regex_k_up"]
    seq_slots = {i: -1 if name is None else slot_of[name] for i, name in enumerate(uses)}
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist()
               for n in (7, 5, 12, 3, 9, 14)]
    kv = PagedKV(model.config)

    # Step 1: five whole prompts and the first chunk of the sixth.
    first = _step(model, slots, kv, {i: p for i, p in enumerate(prompts[:5])} | {5: prompts[5][:6]}, seq_slots)
    for i, name in enumerate(uses):
        expected = ref.logits(name, prompts[i])
        _close(first[i], expected[: len(first[i])], f"{arch} prefill seq {i} ({name})")
        if name is not None:
            base_gap = (expected - ref.logits(None, prompts[i])).abs().max().item()
            assert base_gap > 0.5, f"adapter {name} barely changes the logits ({base_gap:.2e}): vacuous test"

    # Step 2: five decodes and the rest of the chunked prompt, in one batch.
    next_tokens = {i: [int(first[i][-1].argmax())] for i in range(5)}
    second = _step(model, slots, kv, next_tokens | {5: prompts[5][6:]}, seq_slots)
    for i, name in enumerate(uses[:5]):
        _close(second[i][0], ref.logits(name, prompts[i] + next_tokens[i])[-1], f"{arch} decode seq {i} ({name})")
    _close(second[5], ref.logits("regex_k_up", prompts[5])[6:], f"{arch} second chunk")


def test_evicted_slots_are_reused_cleanly(base_dir: Callable[[str], Path], adapter_dir: Callable[..., Path]) -> None:
    """With 2 slots, later adapters overwrite earlier ones (LRU); stale modules of the evicted
    adapter (e.g. ``full``'s MLP weights under ``attn_patterns``) must not leak into the new one."""
    model, adapters, ref = _setup("llama", base_dir, adapter_dir)
    slots = LoRASlots(model, max_loras=2, max_lora_rank=16)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (6, 8)]
    rounds: list[list[str]] = [["full", "mlp_rslora"], ["attn_patterns", "mlp_rslora"], ["regex_k_up", "full"],
                               ["attn_patterns", "full"]]
    for names in rounds:
        slot_of = slots.activate(names, adapters)
        kv = PagedKV(model.config)
        outs = _step(model, slots, kv, {0: prompts[0], 1: prompts[1]}, {0: slot_of[names[0]], 1: slot_of[names[1]]})
        for i, name in enumerate(names):
            _close(outs[i], ref.logits(name, prompts[i]), f"{names}: seq {i} ({name})")
    assert slots.num_loads == 2 + 1 + 2 + 1  # only adapters not resident are copied


def test_no_adapter_step_is_the_base_path(
    base_dir: Callable[[str], Path], adapter_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attached slots with a step where no token uses an adapter: bit-identical to no LoRA, and no LoRA op runs."""
    model, adapters, _ = _setup("qwen2", base_dir, adapter_dir)
    gen = torch.Generator().manual_seed(5)
    prompts = {0: torch.randint(0, model.config.vocab_size, (9,), generator=gen).tolist(), 1: [3, 4, 5]}
    kv = PagedKV(model.config)
    input_ids, positions, meta = kv.step(prompts)
    with torch.no_grad():
        before = model(input_ids, positions, kv.kv_caches, meta)
        slots = LoRASlots(model, max_loras=2, max_lora_rank=16)
        slots.activate(["full"], adapters)

        def fail(*args: object) -> None:
            raise AssertionError("a LoRA op ran in a step without adapter tokens")

        monkeypatch.setattr("kvloom.lora.context.add_lora", fail)
        for mapping in (None, LoRAMapping.from_request_slots([-1, -1], [9, 3])):
            slots.set_mapping(mapping)
            assert slots.context.mapping is None
            assert torch.equal(model(input_ids, positions, kv.kv_caches, meta), before)
        slots.set_mapping(LoRAMapping.from_request_slots([0, -1], [9, 3]))
        with pytest.raises(AssertionError, match="LoRA op ran"):
            model(input_ids, positions, kv.kv_caches, meta)


def test_a_mapping_for_another_step_fails_loudly(
    base_dir: Callable[[str], Path], adapter_dir: Callable[..., Path]
) -> None:
    model, adapters, _ = _setup("llama", base_dir, adapter_dir)
    slots = LoRASlots(model, max_loras=1, max_lora_rank=16)
    slot = slots.activate(["full"], adapters)["full"]
    kv = PagedKV(model.config)
    input_ids, positions, meta = kv.step({0: [5, 6, 7, 8]})
    slots.set_mapping(LoRAMapping.from_request_slots([slot], [3]))
    with torch.no_grad(), pytest.raises(ValueError, match="routes 3 tokens, the forward has 4"):
        model(input_ids, positions, kv.kv_caches, meta)

"""LoRASlots: adapters land in preallocated slots, LRU eviction spares pinned and needed ones, reloads refresh."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvloom.errors import AdapterError
from kvloom.layers.attention import TorchAttentionBackend
from kvloom.layers.linear import Linear
from kvloom.lora.adapter import LoRAAdapter, load_peft_adapter
from kvloom.lora.mapping import LoRAMapping
from kvloom.lora.slots import LoRASlots, slot_bytes
from kvloom.models.loader import load_model
from kvloom.models.registry import CausalLM
from tests.lora.conftest import ALL_MODULES

Adapters = dict[str, LoRAAdapter]


@pytest.fixture
def model(base_dir: Callable[[str], Path]) -> CausalLM:
    return load_model(base_dir("llama"), attn_backend=TorchAttentionBackend())[0]


@pytest.fixture
def adapters(model: CausalLM, adapter_dir: Callable[..., Path]) -> Adapters:
    specs = {
        "full": dict(r=8, alpha=16, target_modules=ALL_MODULES, seed=1),
        "qv": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, seed=2),
        "mlp": dict(r=16, alpha=8, target_modules=["gate_proj", "down_proj"], use_rslora=True, seed=3),
        "k": dict(r=2, alpha=2, target_modules=["k_proj"], seed=4),
    }
    return {name: load_peft_adapter(adapter_dir("llama", **spec), model.config, 16) for name, spec in specs.items()}


def _slot_weights(slots: LoRASlots, slot: int, layer: int, hf_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (A ``[R, in]``, B ``[out, R]``) a slot holds for one HF projection."""
    for stack in slots.stacks[layer]:
        if hf_name in stack.hf_names:
            index = stack.hf_names.index(hf_name)
            row = sum(stack.output_sizes[:index])
            return stack.a[slot, index], stack.b[slot, row:row + stack.output_sizes[index]]
    raise KeyError(hf_name)


def _assert_holds(slots: LoRASlots, slot: int, adapter: LoRAAdapter, num_layers: int) -> None:
    """The slot holds exactly the adapter: its weights zero-padded to R, zeros for modules it doesn't target."""
    for layer in range(num_layers):
        for hf_name in ALL_MODULES:
            a, b = _slot_weights(slots, slot, layer, hf_name)
            pair = adapter.weights.get((layer, hf_name))
            if pair is None:
                assert not a.any() and not b.any(), f"layer {layer} {hf_name}: stale weights"
                continue
            rank = pair[0].shape[0]
            assert torch.equal(a[:rank], pair[0]) and torch.equal(b[:, :rank], pair[1])
            assert not a[rank:].any() and not b[:, rank:].any(), f"layer {layer} {hf_name}: rank padding"


def test_attaches_one_stack_per_projection(model: CausalLM) -> None:
    slots = LoRASlots(model, max_loras=3, max_lora_rank=8)
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.delta is not None]
    assert len(layers) == 4 * model.config.num_layers  # qkv, o, gate_up, down
    assert all(m.delta is not None and m.delta.context is slots.context for m in layers)
    qkv = slots.stacks[0][0]
    c = model.config
    assert qkv.hf_names == ("q_proj", "k_proj", "v_proj")
    assert qkv.a.shape == (3, 3, 8, c.hidden_size)
    assert qkv.b.shape == (3, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, 8)
    held = sum(s.a.nbytes + s.b.nbytes for stacks in slots.stacks.values() for s in stacks)
    assert held == slot_bytes(c, 3, 8, torch.float32)
    assert not any(s.a.any() or s.b.any() for stacks in slots.stacks.values() for s in stacks)
    with pytest.raises(ValueError, match="already has LoRA slots"):
        LoRASlots(model, max_loras=1, max_lora_rank=8)


def test_activate_copies_weights_and_evicts_least_recently_used(model: CausalLM, adapters: Adapters) -> None:
    slots = LoRASlots(model, max_loras=2, max_lora_rank=16)
    buffers = [(s.a.data_ptr(), s.b.data_ptr()) for stacks in slots.stacks.values() for s in stacks]
    first = slots.activate(["full", "qv"], adapters)
    assert sorted(first.values()) == [0, 1] and slots.num_loads == 2
    for name in ("full", "qv"):
        _assert_holds(slots, first[name], adapters[name], model.config.num_layers)

    assert slots.activate(["qv"], adapters) == {"qv": first["qv"]}  # resident: no copy, qv now most recent
    assert slots.num_loads == 2
    mlp = slots.activate(["mlp"], adapters)["mlp"]  # evicts full, the least recently used
    assert mlp == first["full"] and slots.slot_of("full") is None and slots.num_loads == 3
    _assert_holds(slots, mlp, adapters["mlp"], model.config.num_layers)  # full's attention weights are gone

    both = slots.activate(["full", "mlp"], adapters)  # evicts qv, never mlp (needed by this call)
    assert both["mlp"] == mlp and both["full"] == first["qv"]
    assert [(s.a.data_ptr(), s.b.data_ptr()) for stacks in slots.stacks.values() for s in stacks] == buffers

    with pytest.raises(ValueError, match="exceed max_loras=2"):
        slots.activate(["full", "qv", "mlp"], adapters)
    with pytest.raises(ValueError, match="no adapter given"):
        slots.activate(["unknown"], adapters)


def test_pinned_adapters_keep_their_slot_while_the_pins_fit(model: CausalLM, adapters: Adapters) -> None:
    slots = LoRASlots(model, max_loras=2, max_lora_rank=16)
    slots.set_pinned({"k": adapters["k"]})
    pinned = slots.slot_of("k")
    assert pinned is not None
    for name in ("full", "qv", "mlp", "full"):
        assert slots.activate([name], adapters)[name] != pinned
        assert slots.slot_of("k") == pinned
    assert slots.activate(["k", "qv"], {"qv": adapters["qv"]})["k"] == pinned  # pinned needs no adapter given
    with pytest.raises(ValueError, match="exceed max_loras=2"):
        slots.set_pinned({"k": adapters["k"], "full": adapters["full"], "qv": adapters["qv"]})
    slots.set_pinned({})
    assert set(slots.activate(["mlp", "qv"], adapters)) == {"mlp", "qv"}  # k may go now
    _assert_holds(slots, slots.activate(["qv"], adapters)["qv"], adapters["qv"], model.config.num_layers)


def test_pins_never_evict_a_running_adapter_and_come_back_when_it_ends(model: CausalLM, adapters: Adapters) -> None:
    """Pinning every slot while another adapter runs (the engine's defect 3): the running
    adapter keeps its slot, the step it needs still runs, and the pins are resident after."""
    slots = LoRASlots(model, max_loras=2, max_lora_rank=16)
    running = slots.activate(["free"], {"free": adapters["mlp"]})["free"]
    slots.set_pinned({"k": adapters["k"], "qv": adapters["qv"]}, in_use={"free"})
    assert slots.slot_of("free") == running  # not evicted by the pins
    assert slots.activate(["free"], {"free": adapters["mlp"]})["free"] == running  # no ValueError
    _assert_holds(slots, running, adapters["mlp"], model.config.num_layers)
    both = slots.activate(["k"], adapters)  # "free" has ended: both pins fit and are loaded
    assert both["k"] == slots.slot_of("k") and slots.slot_of("qv") is not None and slots.slot_of("free") is None
    _assert_holds(slots, slots.slot_of("qv"), adapters["qv"], model.config.num_layers)


def test_reloading_a_name_with_new_weights_refreshes_its_slot(model: CausalLM, adapters: Adapters) -> None:
    slots = LoRASlots(model, max_loras=2, max_lora_rank=16)
    slot = slots.activate(["x"], {"x": adapters["full"]})["x"]
    assert slots.activate(["x"], {"x": adapters["full"]})["x"] == slot and slots.num_loads == 1
    assert slots.activate(["x"], {"x": adapters["qv"]})["x"] == slot and slots.num_loads == 2
    _assert_holds(slots, slot, adapters["qv"], model.config.num_layers)


def test_rejects_adapters_the_slots_cannot_hold(model: CausalLM, adapters: Adapters) -> None:
    slots = LoRASlots(model, max_loras=2, max_lora_rank=4)
    with pytest.raises(AdapterError, match="rank 8 exceeds max_lora_rank=4"):
        slots.activate(["full"], adapters)
    deep = dataclasses.replace(adapters["k"], content_hash="deep",
                               weights={(7, "k_proj"): adapters["k"].weights[(0, "k_proj")]})
    with pytest.raises(AdapterError, match="layer 7"):
        slots.activate(["deep"], {"deep": deep})
    assert slots.slot_of("full") is None and slots.slot_of("deep") is None  # failed loads leave nothing behind
    assert slots.activate(["k"], adapters)["k"] in (0, 1)


def test_set_mapping_keeps_only_steps_with_adapter_tokens(model: CausalLM) -> None:
    slots = LoRASlots(model, max_loras=2, max_lora_rank=4)
    slots.set_mapping(LoRAMapping.from_request_slots([-1, -1], [4, 1]))
    assert slots.context.mapping is None
    mapping = LoRAMapping.from_request_slots([-1, 1], [4, 1])
    slots.set_mapping(mapping)
    assert slots.context.mapping is mapping
    slots.set_mapping(None)
    assert slots.context.mapping is None
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        slots.set_mapping(LoRAMapping.from_request_slots([2], [3]))


def test_slots_built_in_inference_mode_accept_loads_outside_it(model: CausalLM, adapters: Adapters) -> None:
    """The runner builds slots inside its ``inference_mode`` step; pins arrive outside it."""
    with torch.inference_mode():
        slots = LoRASlots(model, max_loras=2, max_lora_rank=16)
        slots.activate(["qv"], adapters)
    slots.set_pinned({"full": adapters["full"]})
    slot = slots.slot_of("full")
    assert slot is not None
    _assert_holds(slots, slot, adapters["full"], model.config.num_layers)
    with torch.inference_mode():
        slots.activate(["mlp"], adapters)

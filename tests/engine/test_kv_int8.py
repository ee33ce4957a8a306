"""``kv_cache_dtype="int8"`` in the engine: a pool of the same bytes holds ``4 D / (D + 4)`` times the tokens
of a float32 one; the C and torch attention paths read it alike (the same greedy tokens); prefix-cache
hits, ``n`` forks and preemption change nothing (the same tokens as without them); every block comes back;
the setting is refused with a message naming it where it cannot run, and stats say what the cache holds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydantic
import pytest
import torch

from kvloom import LLM, SamplingParams
from kvloom.config import EngineConfig
from kvloom.errors import ConfigError
from kvloom.runner.kv_tensors import choose_kv_dtype

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(5, 500, (n,), generator=g).tolist() for n in (3, 17, 40, 90)]


@pytest.fixture(scope="module")
def model(checkpoint_factory: Callable[..., Path]) -> Path:
    return checkpoint_factory(arch="llama", hidden_size=128, num_heads=2, num_kv_heads=1)  # head_dim 64


def test_the_same_bytes_hold_four_d_over_d_plus_four_times_the_tokens(model: Path) -> None:
    budget = 1 << 22
    float_blocks = LLM(model, dtype="float32", kv_cache_memory=budget).core.num_blocks
    llm = LLM(model, dtype="float32", kv_cache_memory=budget, kv_cache_dtype="int8")
    assert llm.kv_cache_dtype == "int8"
    assert llm.core.num_blocks == pytest.approx(float_blocks * 4 * 64 / 68, abs=1)  # 3.76x


def test_the_c_and_torch_attention_paths_read_it_alike(model: Path) -> None:
    outs = []
    for backend in ("cpu", "torch"):
        llm = LLM(model, dtype="float32", kv_cache_dtype="int8", attention_backend=backend)
        outs.append([c.token_ids for c in llm.generate(_prompts(), GREEDY)])
        llm.core.assert_idle()
    assert outs[0] == outs[1]


def test_prefix_hits_forks_and_preemption_change_nothing(model: Path) -> None:
    llm = LLM(model, dtype="float32", kv_cache_dtype="int8")
    first = [c.token_ids for c in llm.generate(_prompts(), GREEDY)]
    again = llm.generate(_prompts(), GREEDY)
    assert [c.token_ids for c in again] == first and sum(c.usage.cached_tokens for c in again) > 0
    forked = llm.generate(_prompts()[3], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, n=2))[0]
    assert [choice.token_ids for choice in forked.choices] == [first[3], first[3]]
    # A pool too small for all four at once: sequences are preempted and recomputed.
    tight = LLM(model, dtype="float32", kv_cache_dtype="int8", num_kv_blocks=12, block_size=16)
    assert [c.token_ids for c in tight.generate(_prompts(), GREEDY)] == first
    assert tight.core.num_preemptions > 0
    tight.core.assert_idle()
    llm.core.assert_idle()


def test_the_setting_is_refused_where_it_cannot_run(model: Path) -> None:
    with pytest.raises(ConfigError, match="kv_cache_dtype='fp8_e4m3' needs a GPU with FP8"):
        LLM(model, dtype="float32", kv_cache_dtype="fp8_e4m3")
    with pytest.raises(ConfigError, match="kv_cache_dtype='int8' runs on CPU"):
        choose_kv_dtype("int8", torch.bfloat16, torch.device("cuda"))
    with pytest.raises(pydantic.ValidationError, match="kv_cache_dtype"):
        EngineConfig(model=model, kv_cache_dtype="int4")  # type: ignore[arg-type]
    assert choose_kv_dtype("auto", torch.bfloat16, torch.device("cpu")) == torch.bfloat16

"""Grouped LoRA shrink/expand: torch references vs a float64 per-token oracle, Triton (interpreted) vs the references.

Cases cover several slots, tokens without an adapter, shuffled token order, per-slot ranks
below R (zero padding), odd sizes, fused slices of different widths (q vs k/v), ranks and
segments spanning several tiles, and NaN poisoning: inactive slots' weights and no-adapter
tokens' output rows are NaN, so any read of them shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvloom.kernels.lora_expand import lora_expand, lora_expand_ref
from kvloom.kernels.lora_shrink import lora_shrink, lora_shrink_ref
from kvloom.lora.mapping import LoRAMapping
from tests.kernels.lora_cases import (
    LoRACase,
    make_case,
    oracle_delta,
    oracle_shrink,
    shuffled_slots,
    token_mapping,
)


@dataclass(frozen=True)
class Spec:
    num_tokens: int
    num_slots: int
    in_features: int
    output_sizes: tuple[int, ...]
    max_rank: int
    ranks: tuple[int, ...]
    no_adapter_every: int = 4


SPECS = {
    # 3 fused slices of different widths (q/k/v with GQA), odd in_features, ranks below R.
    "qkv_odd": Spec(23, 4, 37, (40, 24, 24), 8, (8, 3, 5, 1)),
    # one slice, rank R not a power of two, one slot unused (its weights are NaN).
    "single_slice": Spec(17, 5, 48, (33,), 20, (20, 7, 20, 1, 20)),
    # segments longer than one m tile, rank spanning two n tiles, outputs spanning two n tiles.
    "multi_tile": Spec(150, 3, 40, (72, 72), 80, (80, 65, 16), no_adapter_every=7),
    # every token uses an adapter, one slot.
    "all_one_slot": Spec(9, 2, 16, (16,), 4, (4, 4), no_adapter_every=10**6),
}


def _case(name: str, dtype: torch.dtype = torch.float32) -> LoRACase:
    spec = SPECS[name]
    slots = shuffled_slots(spec.num_tokens, spec.num_slots, spec.no_adapter_every, seed=spec.num_tokens)
    if name == "single_slice":
        slots = [-1 if s == 3 else s for s in slots]  # slot 3 has no token
    if name == "all_one_slot":
        slots = [1] * spec.num_tokens
    return make_case(slots, spec.num_slots, spec.in_features, spec.output_sizes, spec.max_rank, spec.ranks,
                     dtype=dtype, seed=len(name))


def _run(case: LoRACase, triton: bool, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, out) after shrink and expand; ``out`` starts as base values with NaN rows for no-adapter tokens."""
    shrink, expand = (lora_shrink, lora_expand) if triton else (lora_shrink_ref, lora_expand_ref)
    m = case.mapping
    if out is None:
        out = _base_out(case)
    y = torch.full((len(m.token_ids), case.a.shape[1], case.a.shape[2]), float("nan"))
    shrink(case.x, case.a, *case.args(), m.max_seg_len, out=y)
    expand(y, case.b, out, *case.args(), case.output_sizes, m.max_seg_len)
    return y, out


def _base_out(case: LoRACase) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    out = torch.randn(case.x.shape[0], sum(case.output_sizes), generator=gen).to(case.x.dtype)
    out[torch.tensor(case.token_slots) < 0] = float("nan")
    return out


def _check_against_oracle(case: LoRACase, y: torch.Tensor, out: torch.Tensor, atol: float) -> None:
    base = _base_out(case).double()
    has_adapter = torch.tensor(case.token_slots) >= 0
    assert torch.isnan(out[~has_adapter]).all(), "rows of tokens without an adapter were written"
    torch.testing.assert_close(y.double(), oracle_shrink(case), atol=atol, rtol=0)
    expected = (base + oracle_delta(case))[has_adapter]
    torch.testing.assert_close(out[has_adapter].double(), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("name", list(SPECS))
def test_reference_matches_per_token_oracle(name: str) -> None:
    case = _case(name)
    y, out = _run(case, triton=False)
    _check_against_oracle(case, y, out, atol=1e-4)


@pytest.mark.parametrize("name", list(SPECS))
def test_triton_matches_reference(name: str, triton_interpret: None) -> None:
    case = _case(name)
    y_ref, out_ref = _run(case, triton=False)
    y, out = _run(case, triton=True)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    _check_against_oracle(case, y, out, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_triton_matches_reference(dtype: torch.dtype, triton_interpret: None) -> None:
    case = _case("qkv_odd", dtype)
    y_ref, out_ref = _run(case, triton=False)
    y, out = _run(case, triton=True)
    assert out.dtype == dtype and y.dtype == torch.float32
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(out, out_ref, atol=tol, rtol=tol, equal_nan=True)


def test_triton_expand_into_strided_output(triton_interpret: None) -> None:
    """``out`` as a column slice of a wider buffer (e.g. a view into a fused activation)."""
    case = _case("qkv_odd")
    _, out_ref = _run(case, triton=False)
    wide = torch.full((case.x.shape[0], sum(case.output_sizes) + 5), 7.0)
    view = wide[:, 3:3 + sum(case.output_sizes)]
    view.copy_(_base_out(case))
    _run(case, triton=True, out=view)
    torch.testing.assert_close(view, out_ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert (wide[:, :3] == 7).all() and (wide[:, -2:] == 7).all()


@pytest.mark.parametrize("triton", [False, True], ids=["ref", "triton"])
def test_no_adapter_tokens_is_a_no_op(triton: bool, request: pytest.FixtureRequest) -> None:
    if triton:
        request.getfixturevalue("triton_interpret")
    case = make_case([-1] * 5, 2, 16, (8, 8), 4, (4, 4))
    assert not case.mapping.has_lora and len(case.mapping.token_ids) == 0
    y, out = _run(case, triton=triton)
    assert y.shape == (0, 2, 4) and torch.isnan(out).all()


def test_mapping_groups_tokens_by_slot() -> None:
    mapping = token_mapping([2, -1, 0, 2, 0, -1, 2])
    assert mapping.token_ids.tolist() == [2, 4, 0, 3, 6]
    assert (mapping.seg_slots_cpu, mapping.seg_starts_cpu, mapping.seg_lens_cpu) == ((0, 2), (0, 2), (2, 3))
    assert mapping.seg_slots.tolist() == [0, 2] and mapping.max_seg_len == 3 and mapping.num_tokens == 7
    by_request = LoRAMapping.from_request_slots([2, -1, 0, 2], [2, 1, 3, 1])
    assert by_request.token_ids.tolist() == [3, 4, 5, 0, 1, 6]
    assert (by_request.seg_slots_cpu, by_request.seg_starts_cpu, by_request.seg_lens_cpu) == ((0, 2), (0, 3), (3, 3))
    assert by_request.num_tokens == 7
    assert not LoRAMapping.from_request_slots([-1, -1], [3, 1]).has_lora

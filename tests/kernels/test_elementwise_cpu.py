"""The fused C elementwise kernels (silu_and_mul, add + RMSNorm, rotary) against the torch layers they
replace: float32 within a few ulp (sums in another order; rotary bit-equal), bf16 within one bf16
rounding step (rotary bit-equal), the same bits on one thread or two, extreme inputs (exp overflow and
underflow) handled as torch handles them, inputs never written; and the layers take them only after
``fuse_on_cpu``, for the shapes they cover."""

import ctypes
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvloom.kernels import elementwise_cpu, native
from kvloom.kernels.elementwise_cpu import (
    add_rms_norm_cpu,
    rotary_cpu,
    silu_and_mul_cpu,
    supports,
    supports_rotary,
)
from kvloom.layers.activation import SiluAndMul
from kvloom.layers.norm import RMSNorm
from kvloom.layers.rotary import ApplyRotary, RotaryEmbedding, apply_rotary
from tests.kernels.threads import with_threads


def _bf16_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between two bf16 tensors in units of bf16's spacing at each value."""
    spacing = torch.maximum(b.float().abs(), torch.full_like(b.float(), 1e-30)).log2().floor().exp2() * 2**-7
    return int(((a.float() - b.float()).abs() / spacing).max().item())


def _norm(hidden: int, dtype: torch.dtype, seed: int = 0) -> RMSNorm:
    norm = RMSNorm(hidden, 1e-6, dtype)
    norm.weight.data = torch.randn(hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return norm


@pytest.mark.parametrize("rows", [1, 3, 64, 300])
def test_silu_and_mul_float32_matches_torch(rows: int) -> None:
    x = torch.randn(rows, 2 * 176, generator=torch.Generator().manual_seed(rows)) * 6
    expected = F.silu(x[:, :176]) * x[:, 176:]
    before = x.clone()
    torch.testing.assert_close(silu_and_mul_cpu(x), expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(x, before)


def test_silu_and_mul_bfloat16_is_within_one_rounding_of_torch() -> None:
    x = (torch.randn(64, 2 * 512, generator=torch.Generator().manual_seed(1)) * 6).bfloat16()
    out = silu_and_mul_cpu(x)
    assert out.dtype == torch.bfloat16
    assert _bf16_steps(out, F.silu(x[:, :512]) * x[:, 512:]) <= 1


def test_silu_and_mul_handles_exp_overflow_underflow_and_strided_rows() -> None:
    wide = torch.zeros(2, 64)
    wide[:, :16] = torch.tensor([-200.0, -100.0, -88.8, -88.0, -20.0, -1e-3, 0.0, 1e-3,
                                 5.0, 20.0, 87.0, 88.8, 100.0, 200.0, float("inf"), float("-inf")])
    wide[:, 16:32] = 1.5
    x = wide[:, :32]  # [2, 32] rows 64 apart: gate 16 | up 16
    out = silu_and_mul_cpu(x)
    expected = F.silu(x[:, :16]) * x[:, 16:]
    torch.testing.assert_close(out[:, :14], expected[:, :14], atol=1e-30, rtol=1e-6)
    assert out[0, 14] == float("inf") and out[0, 15].isnan() == expected[0, 15].isnan()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_the_torch_layer(dtype: torch.dtype, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    x, residual = (torch.randn(37, 256, generator=gen) * 3).to(dtype), torch.randn(37, 256, generator=gen).to(dtype)
    norm = _norm(256, dtype)
    x_before, residual_before = x.clone(), residual.clone()
    if with_residual:
        expected, expected_sum = norm.forward_add(x, residual)
        out, total = add_rms_norm_cpu(x, residual, norm.weight, norm.eps)
        assert torch.equal(total, expected_sum)  # one rounded add, as torch's
    else:
        expected = norm(x)
        out, total = add_rms_norm_cpu(x, None, norm.weight, norm.eps)
        assert total is x
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-6)
    else:
        assert _bf16_steps(out, expected) <= 1


def test_one_thread_and_two_give_the_same_bits() -> None:
    gen = torch.Generator().manual_seed(4)
    x, residual = torch.randn(50, 512, generator=gen), torch.randn(50, 512, generator=gen)
    norm = _norm(512, torch.float32)
    for fn in (lambda: silu_and_mul_cpu(x), lambda: add_rms_norm_cpu(x, residual, norm.weight, norm.eps)[0]):
        assert torch.equal(with_threads(1, fn), with_threads(2, fn))


def test_what_the_kernels_take_and_refuse() -> None:
    assert supports(torch.zeros(4, 32)) and supports(torch.zeros(4, 32, dtype=torch.bfloat16))
    assert not supports(torch.zeros(4, 2, 16))  # per-head q/k norms: 3-D views stay on torch
    assert not supports(torch.zeros(4, 24))  # halves not a multiple of 8
    assert not supports(torch.zeros(4, 32, dtype=torch.float16))
    assert not supports(torch.zeros(32, 4).t())  # columns contiguous, rows not
    with pytest.raises(ValueError, match="silu_and_mul_cpu"):
        silu_and_mul_cpu(torch.zeros(4, 24))
    with pytest.raises(ValueError, match="add_rms_norm_cpu"):
        add_rms_norm_cpu(torch.zeros(4, 32), torch.zeros(4, 32), torch.zeros(16), 1e-6)


def test_layers_take_the_kernels_only_after_fuse_on_cpu_and_only_where_they_apply(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kvloom.kernels import elementwise_cpu

    calls: list[str] = []
    for name in ("silu_and_mul_cpu", "add_rms_norm_cpu"):
        real = getattr(elementwise_cpu, name)
        monkeypatch.setattr(elementwise_cpu, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    act, norm = SiluAndMul(), _norm(64, torch.float32)
    x, residual = torch.randn(5, 64), torch.randn(5, 64)
    plain = (act(x), norm.forward_add(x, residual), norm(x))
    assert calls == []
    act.fuse_on_cpu()
    norm.fuse_on_cpu()
    fused = (act(x), norm.forward_add(x, residual), norm(x))
    assert calls == ["silu_and_mul_cpu", "add_rms_norm_cpu", "add_rms_norm_cpu"]
    torch.testing.assert_close(fused, plain, atol=2e-6, rtol=2e-6)
    heads = torch.randn(5, 4, 16)  # a q/k norm over heads: torch
    per_head = RMSNorm(16, 1e-6)
    per_head.weight.data = torch.randn(16)
    per_head.fuse_on_cpu()
    torch.testing.assert_close(per_head(heads), heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-6)
                               * per_head.weight, atol=1e-6, rtol=1e-6)
    assert calls == ["silu_and_mul_cpu", "add_rms_norm_cpu", "add_rms_norm_cpu"]


def _rotary_case(tokens: int, heads: int, head_dim: int, dtype: torch.dtype,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A strided ``[T, H, D]`` view (rows padded, as q|k inside a fused qkv row) and its cos/sin, at
    positions up to 8191 (large angles: the products' rounding matters)."""
    gen = torch.Generator().manual_seed(seed)
    cos, sin = RotaryEmbedding(head_dim, 8192, 10000.0, None, dtype)(torch.randint(0, 8192, (tokens,), generator=gen))
    rows = torch.randn(tokens, heads * head_dim + 24, generator=gen).to(dtype)
    return rows[:, 8: 8 + heads * head_dim].view(tokens, heads, head_dim), cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("tokens", "heads", "head_dim"), [(1, 1, 2), (7, 3, 12), (33, 20, 64), (5, 2, 128)], ids=str)
def test_rotary_is_bit_equal_to_torch(dtype: torch.dtype, tokens: int, heads: int, head_dim: int) -> None:
    # D/2 = 1, 6 (no 8-wide vector), 32, 64: the scalar tail and the vector path. Bit-equal means the
    # compiler kept every product rounded before the add (an FMA would round once: a different result).
    x, cos, sin = _rotary_case(tokens, heads, head_dim, dtype)
    before = x.clone()
    out = rotary_cpu(x, cos, sin)
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, apply_rotary(x, cos, sin))
    assert torch.equal(x, before)


def test_rotary_one_thread_and_two_give_the_same_bits_and_edge_cases() -> None:
    x, cos, sin = _rotary_case(64, 4, 32, torch.float32, seed=3)
    assert torch.equal(with_threads(1, lambda: rotary_cpu(x, cos, sin)), with_threads(2, lambda: rotary_cpu(x, cos, sin)))
    assert rotary_cpu(x[:0], cos[:0], sin[:0]).shape == (0, 4, 32)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 3e38, -3e38, 1e-45])
    x = special.repeat(3, 2, 2).view(3, 2, 16)  # each head's halves hold every special value
    torch.testing.assert_close(rotary_cpu(x, cos[:3, :, :8], sin[:3, :, :8]),
                               apply_rotary(x, cos[:3, :, :8], sin[:3, :, :8]), equal_nan=True, atol=0, rtol=0)


def test_what_rotary_takes_and_refuses() -> None:
    x, cos, sin = _rotary_case(4, 2, 16, torch.float32)
    assert supports_rotary(x, cos) and supports_rotary(x, cos[:, 0])
    assert not supports_rotary(x.to(torch.float16), cos.to(torch.float16))
    assert not supports_rotary(x, cos.bfloat16())  # tables in another dtype
    assert not supports_rotary(x.transpose(1, 2), cos)  # last dimension not contiguous
    assert not supports_rotary(x[:, :, :15], cos)  # odd head size
    assert not supports_rotary(x, cos[:3])  # a table row short
    with pytest.raises(ValueError, match="rotary_cpu"):
        rotary_cpu(x, cos[:3], sin[:3])


def test_apply_rotary_takes_the_kernel_only_after_fuse_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvloom.kernels import elementwise_cpu

    calls: list[int] = []
    real = elementwise_cpu.rotary_cpu
    monkeypatch.setattr(elementwise_cpu, "rotary_cpu", lambda *a: calls.append(1) or real(*a))
    rotary = ApplyRotary()
    x, cos, sin = _rotary_case(6, 3, 16, torch.float32)
    expected = apply_rotary(x, cos, sin)
    assert torch.equal(rotary(x, cos, sin), expected) and calls == []
    rotary.fuse_on_cpu()
    assert torch.equal(rotary(x, cos, sin), expected) and calls == [1]
    half = x.half()
    assert torch.equal(rotary(half, cos.half(), sin.half()), apply_rotary(half, cos.half(), sin.half()))
    assert calls == [1]  # float16: torch


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_every_vector_width_gives_the_same_bits(capability: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # silu_and_mul runs 16 lanes at a time in an AVX512 build and 8 otherwise (halves of 24: 16 then 8):
    # lane by lane, so the same bits (the AVX2 and AVX512 builds; the DEFAULT build has no FMA). The norm's sum of squares runs in another order per width: within a few float32 ulp of the
    # bf16/fp32 result. Each build is compiled; the ones this CPU can execute are compared.
    path = native.build(elementwise_cpu.SOURCE, flags=native.compile_flags(capability), directory=tmp_path)
    assert path.exists()
    runnable = {"DEFAULT": True, "AVX2": torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"),
                "AVX512": torch.backends.cpu.get_cpu_capability() == "AVX512"}
    if not runnable[capability]:
        return  # compiled (asserted above); this CPU cannot execute it
    gen = torch.Generator().manual_seed(11)
    cases = [(dtype, rows, width) for dtype in (torch.float32, torch.bfloat16) for rows, width in ((5, 2 * 2816), (3, 48))]
    expected = {case: _run_elementwise(case, gen.initial_seed()) for case in cases}
    monkeypatch.setattr(elementwise_cpu, "load", lambda: elementwise_cpu.bind(ctypes.CDLL(str(path))))
    for case in cases:
        silu, norm = _run_elementwise(case, gen.initial_seed())
        if capability == "DEFAULT":  # no FMA there: exp's polynomial rounds twice a step
            torch.testing.assert_close(silu, expected[case][0], atol=0, rtol=1e-6 if case[0] == torch.float32 else 8e-3)
        else:
            assert torch.equal(silu, expected[case][0]), (capability, case)
        torch.testing.assert_close(norm, expected[case][1], atol=0, rtol=2e-6 if case[0] == torch.float32 else 8e-3)


def _run_elementwise(case: tuple[torch.dtype, int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    dtype, rows, width = case
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=gen) * 4).to(dtype)
    h, r = torch.randn(rows, width, generator=gen).to(dtype), torch.randn(rows, width, generator=gen).to(dtype)
    w = torch.randn(width, generator=gen).to(dtype)
    return silu_and_mul_cpu(x), add_rms_norm_cpu(h, r, w, 1e-6)[0]

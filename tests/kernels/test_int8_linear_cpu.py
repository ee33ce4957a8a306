"""The int8-weight linear kernels in C against their torch references: the quantization is off by at
most half a step per weight; the kernel equals the float32 product with the dequantized weights up to
float32 summation order (a bound computed per output, not a loose tolerance); bf16 inputs give the
reference rounded once; odd row and channel counts, a bias or none, strided rows; the same bits on one
thread or two; and inputs it cannot take are refused with a message."""


import pytest
import torch

from kvloom.kernels.int8_linear_cpu import (
    dequantize_reference,
    int8_dequant_cpu,
    int8_linear_cpu,
    int8_linear_reference,
    quantize_per_channel,
    supports,
)
from tests.kernels.threads import with_threads

EPS32 = 2.0**-24


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _summation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """How far two float32 sums of the products ``x[m, k] * w[n, k]`` in different orders can be apart:
    each is within ``K * eps * sum_k |x w|`` of the exact sum (plus a rounding of the scale)."""
    k = x.shape[1]
    return 2 * (k + 2) * EPS32 * (x.abs().double() @ w.abs().double().T) + 1e-30


def test_quantization_is_off_by_at_most_half_a_step() -> None:
    w = torch.randn(37, 96, generator=_gen(0)) * torch.linspace(0.01, 5, 37)[:, None]
    w[5] = 0.0  # an all-zero row keeps scale 1 and q 0
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape and scale.shape == (37,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.equal(q[5], torch.zeros(96, dtype=torch.int8)) and scale[5] == 1.0
    error = (dequantize_reference(q, scale) - w).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 1e-6)).all())


@pytest.mark.parametrize(("rows", "out", "k"), [(1, 7, 16), (2, 13, 48), (3, 64, 1024), (5, 33, 2816), (9, 4, 32)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_the_dequantized_float_product(rows: int, out: int, k: int, bias: bool) -> None:
    g = _gen(rows * 1000 + out)
    q, scale = quantize_per_channel(torch.randn(out, k, generator=g))
    x = torch.randn(rows, k, generator=g) * 3
    b = torch.randn(out, generator=g) if bias else None
    got = int8_linear_cpu(x, q, scale, b)
    expected = int8_linear_reference(x, q, scale, b)
    assert got.shape == (rows, out) and got.dtype == torch.float32 and got.is_contiguous()
    bound = _summation_bound(x, dequantize_reference(q, scale))
    assert bool(((got.double() - expected.double()).abs() <= bound).all())


def test_kernel_reads_strided_rows_and_never_writes_its_inputs() -> None:
    g = _gen(3)
    q, scale = quantize_per_channel(torch.randn(24, 64, generator=g))
    wide = torch.randn(4, 100, generator=g)
    x = wide[:, 10:74]  # rows 100 elements apart
    before = (wide.clone(), q.clone(), scale.clone())
    got = int8_linear_cpu(x, q, scale)
    torch.testing.assert_close(got, int8_linear_reference(x.contiguous(), q, scale), rtol=1e-5, atol=1e-5)
    assert torch.equal(wide, before[0]) and torch.equal(q, before[1]) and torch.equal(scale, before[2])


def test_bf16_inputs_give_the_float32_result_rounded_once() -> None:
    g = _gen(4)
    q, scale = quantize_per_channel(torch.randn(40, 256, generator=g))
    x = torch.randn(3, 256, generator=g).bfloat16()
    b = torch.randn(40, generator=g)
    got = int8_linear_cpu(x, q, scale, b)
    assert got.dtype == torch.bfloat16
    exact = torch.nn.functional.linear(x.float(), dequantize_reference(q, scale), b)
    # one bf16 rounding of a float32 result that is itself within the summation bound
    assert bool(((got.float() - exact).abs() <= exact.abs() * 2**-8 + _summation_bound(x.float(), dequantize_reference(q, scale)).float()).all())


def test_results_do_not_depend_on_the_thread_count() -> None:
    g = _gen(5)
    q, scale = quantize_per_channel(torch.randn(130, 512, generator=g))
    x = torch.randn(5, 512, generator=g)
    one = with_threads(1, lambda: int8_linear_cpu(x, q, scale))
    two = with_threads(2, lambda: int8_linear_cpu(x, q, scale))
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_equals_the_reference_bit_for_bit(dtype: torch.dtype) -> None:
    q, scale = quantize_per_channel(torch.randn(19, 40, generator=_gen(6)))
    assert torch.equal(int8_dequant_cpu(q, scale, dtype), dequantize_reference(q, scale, dtype))
    out = torch.empty(19, 40, dtype=dtype)
    assert int8_dequant_cpu(q, scale, dtype, out=out) is out
    with pytest.raises(ValueError, match="out must be"):
        int8_dequant_cpu(q, scale, dtype, out=torch.empty(19, 41, dtype=dtype))


def test_inputs_it_cannot_take_are_refused() -> None:
    q, scale = quantize_per_channel(torch.randn(8, 24, generator=_gen(7)))
    assert not supports(torch.randn(1, 24), q)  # K not a multiple of 16
    with pytest.raises(ValueError, match="K % 16"):
        int8_linear_cpu(torch.randn(1, 24), q, scale)
    q16, s16 = quantize_per_channel(torch.randn(8, 32, generator=_gen(8)))
    assert not supports(torch.randn(1, 32, dtype=torch.float16), q16)
    with pytest.raises(ValueError, match="scale must be"):
        int8_linear_cpu(torch.randn(1, 32), q16, s16.double())
    with pytest.raises(ValueError, match="bias must be"):
        int8_linear_cpu(torch.randn(1, 32), q16, s16, torch.zeros(7))
    assert int8_linear_cpu(torch.randn(0, 32), q16, s16).shape == (0, 8)

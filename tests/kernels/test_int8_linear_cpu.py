"""The int8-weight linear kernels in C against their torch references: the weight quantization is off by
at most half a step per weight, the activation quantization by half a step of its block; the kernel
equals its reference (activations quantized per block of 32, integer block sums) up to float32 summation
order (a bound computed per output, not a loose tolerance), and the reference is within the two roundings'
bound of the float product; the packed layout round-trips; bf16 inputs give the reference rounded once;
odd row, channel and K counts, a bias or none, strided rows; the same bits on one thread or two; and
inputs it cannot take are refused with a message."""


import pytest
import torch

from kvloom.kernels.int8_linear_cpu import (
    dequantize_reference,
    int8_dequant_cpu,
    int8_linear_cpu,
    int8_linear_reference,
    pack,
    quantize_activations_reference,
    quantize_per_channel,
    rounding_bound,
    supports,
    unpack,
)
from tests.kernels.threads import with_threads

EPS32 = 2.0**-24


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _summation_bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """How far the kernel's float32 sum can be from the float64 reference: the block sums are exact integers;
    each of the ``K / 32 + 8`` float32 additions and the two scalings rounds within ``eps`` of a partial sum
    no larger than ``sum_k |xs xq q scale|``."""
    xq, xs = quantize_activations_reference(x)
    k = q.shape[1]
    xhat = (xq.double() * xs.double().repeat_interleave(32, dim=1))[:, :k]
    blocks = xq.shape[1] // 32
    return 2 * (blocks + 12) * EPS32 * (xhat.abs() @ dequantize_reference(q, scale, torch.float64).abs().T) + 1e-30


def test_quantization_is_off_by_at_most_half_a_step() -> None:
    w = torch.randn(37, 96, generator=_gen(0)) * torch.linspace(0.01, 5, 37)[:, None]
    w[5] = 0.0  # an all-zero row keeps scale 1 and q 0
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape and scale.shape == (37,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.equal(q[5], torch.zeros(96, dtype=torch.int8)) and scale[5] == 1.0
    error = (dequantize_reference(q, scale) - w).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 1e-6)).all())


def test_activations_are_off_by_at_most_half_a_step_of_their_block() -> None:
    x = torch.randn(3, 70, generator=_gen(1)) * torch.linspace(0.01, 9, 70)
    x[1, 32:64] = 0.0  # an all-zero block: scale 0, q 0
    xq, xs = quantize_activations_reference(x)
    assert xq.shape == (3, 96) and xs.shape == (3, 3) and xq.dtype == torch.int8
    assert torch.equal(xq[:, 70:], torch.zeros(3, 26, dtype=torch.int8))  # K padded with zeros
    assert xs[1, 1] == 0 and torch.equal(xq[1, 32:64], torch.zeros(32, dtype=torch.int8))
    error = (xq.float() * xs.repeat_interleave(32, dim=1))[:, :70] - x
    assert bool((error.abs() <= xs.repeat_interleave(32, dim=1)[:, :70] / 2 * (1 + 1e-6)).all())


def test_the_packed_layout_round_trips_and_pads_with_zeros() -> None:
    q, _ = quantize_per_channel(torch.randn(13, 70, generator=_gen(2)))
    packed = pack(q)
    assert packed.shape == (4, 3, 4, 32) and packed.is_contiguous()
    assert torch.equal(unpack(packed, 13, 70), q)
    assert int(packed.abs().sum()) == int(q.abs().sum())  # the padding is zeros
    assert torch.equal(packed[1, 2, 3, :6], q[7, 64:70])


@pytest.mark.parametrize(("rows", "out", "k"),
                         [(1, 7, 16), (2, 13, 48), (3, 64, 1024), (5, 33, 2816), (9, 4, 32), (4, 10, 70)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_its_reference_and_the_reference_the_float_product(
    rows: int, out: int, k: int, bias: bool,
) -> None:
    g = _gen(rows * 1000 + out)
    w = torch.randn(out, k, generator=g)
    q, scale = quantize_per_channel(w)
    x = torch.randn(rows, k, generator=g) * 3
    b = torch.randn(out, generator=g) if bias else None
    got = int8_linear_cpu(x, pack(q), scale, b)
    expected = int8_linear_reference(x, q, scale, b)
    assert got.shape == (rows, out) and got.dtype == torch.float32 and got.is_contiguous()
    assert bool(((got.double() - expected.double()).abs() <= _summation_bound(x, q, scale)).all())
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    bound = rounding_bound(x, q, scale) * (1 + 1e-6) + 1e-5
    assert bool(((expected.double() - exact).abs() <= bound).all())


def test_kernel_reads_strided_rows_and_never_writes_its_inputs() -> None:
    g = _gen(3)
    q, scale = quantize_per_channel(torch.randn(24, 64, generator=g))
    wide = torch.randn(4, 100, generator=g)
    x = wide[:, 10:74]  # rows 100 elements apart
    before = (wide.clone(), q.clone(), scale.clone())
    got = int8_linear_cpu(x, pack(q), scale)
    torch.testing.assert_close(got, int8_linear_reference(x.contiguous(), q, scale), rtol=1e-5, atol=1e-5)
    assert torch.equal(wide, before[0]) and torch.equal(q, before[1]) and torch.equal(scale, before[2])


def test_bf16_inputs_give_the_float32_result_rounded_once() -> None:
    g = _gen(4)
    q, scale = quantize_per_channel(torch.randn(40, 256, generator=g))
    x = torch.randn(3, 256, generator=g).bfloat16()
    b = torch.randn(40, generator=g)
    got = int8_linear_cpu(x, pack(q), scale, b)
    assert got.dtype == torch.bfloat16
    expected = int8_linear_reference(x.float(), q, scale, b).double()
    # one bf16 rounding of a float32 result that is itself within the summation bound
    bound = expected.abs() * 2**-8 + _summation_bound(x.float(), q, scale)
    assert bool(((got.double() - expected).abs() <= bound).all())


def test_results_do_not_depend_on_the_thread_count() -> None:
    g = _gen(5)
    q, scale = quantize_per_channel(torch.randn(130, 512, generator=g))
    x = torch.randn(5, 512, generator=g)
    packed = pack(q)
    one = with_threads(1, lambda: int8_linear_cpu(x, packed, scale))
    two = with_threads(2, lambda: int8_linear_cpu(x, packed, scale))
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_equals_the_reference_bit_for_bit(dtype: torch.dtype) -> None:
    q, scale = quantize_per_channel(torch.randn(19, 40, generator=_gen(6)))
    packed = pack(q)
    assert torch.equal(int8_dequant_cpu(packed, scale, 40, dtype), dequantize_reference(q, scale, dtype))
    assert torch.equal(int8_dequant_cpu(packed, scale, 40, dtype, start=8, stop=19),
                       dequantize_reference(q, scale, dtype)[8:])
    out = torch.empty(19, 40, dtype=dtype)
    assert int8_dequant_cpu(packed, scale, 40, dtype, out=out) is out
    with pytest.raises(ValueError, match="out must be"):
        int8_dequant_cpu(packed, scale, 40, dtype, out=torch.empty(19, 41, dtype=dtype))
    with pytest.raises(ValueError, match="start % 4 == 0"):
        int8_dequant_cpu(packed, scale, 40, dtype, start=3)


def test_inputs_it_cannot_take_are_refused() -> None:
    q, scale = quantize_per_channel(torch.randn(8, 32, generator=_gen(8)))
    packed = pack(q)
    assert not supports(torch.randn(1, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="need a CPU float32/bf16 x"):
        int8_linear_cpu(torch.randn(1, 32, dtype=torch.float16), packed, scale)
    with pytest.raises(ValueError, match="packed weights must be"):
        int8_linear_cpu(torch.randn(1, 32), q, scale)  # not packed
    with pytest.raises(ValueError, match="packed weights must be"):
        int8_linear_cpu(torch.randn(1, 40), packed, scale)  # another K
    with pytest.raises(ValueError, match="scale must be"):
        int8_linear_cpu(torch.randn(1, 32), packed, scale.double())
    with pytest.raises(ValueError, match="bias must be"):
        int8_linear_cpu(torch.randn(1, 32), packed, scale, torch.zeros(7))
    assert int8_linear_cpu(torch.randn(0, 32), packed, scale).shape == (0, 8)

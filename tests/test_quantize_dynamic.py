"""synq_kernels.ops.quantize.quantize_dynamic / quantize_dynamic_rows (the exporter's run-time
input quantization, per tensor and per row): the CPU kernels against the reference's PyTorch
ops, bit for bit, strides included."""
import pytest
import torch

import synq_kernels as sk
from synq_kernels.ops import quantize as Q
from synq_kernels.reference import quantize as R
from portable import run_portable

needs_cpu = pytest.mark.skipif(not Q._has_kernel(), reason="synq_kernels._C not built")
EPS = 1e-8


def _same(a, b):
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape and u.stride() == v.stride()
        torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)


@needs_cpu
def test_matches_reference_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 24, 56, 56), (2, 3, 7, 5), (1, 1000), (3, 17), (1, 1, 1, 1), (70001,)]
    for i in range(120):
        shape = shapes[i % len(shapes)]
        mag = 10 ** (torch.rand(1, generator=gen).item() * 7 - 4)
        x = torch.randn(shape, generator=gen) * mag
        kind = i % 6
        if kind == 1:
            x = x.abs() + 0.5              # all positive: lo widened to 0
        elif kind == 2:
            x = -x.abs() - 0.1             # all negative: hi widened to 0
        elif kind == 3:
            x = torch.zeros(shape)         # scale at eps
        elif kind == 4 and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        elif kind == 4 and x.dim() == 2:
            x = x.t()                      # a transposed view: dense, not contiguous
        elif kind == 5:
            x = torch.full(shape, 3.7)
        _same(torch.ops.synq._quantize_dynamic(x, EPS), R.quantize_dynamic(x, EPS))


@needs_cpu
def test_rounds_half_to_even():
    # lo = -0.5, hi = 31.375: scale = 31.875 / 255 = 0.125 exactly, so x / scale = k + 0.5
    x = torch.tensor([-0.5, 31.375, 0.0625, 0.1875, -0.0625, -0.1875, 1.3125, 2.0])
    q, scale, zero = torch.ops.synq._quantize_dynamic(x, EPS)
    assert scale.item() == 0.125 and zero.item() == 4 - 128
    # x / scale: 0.5 -> 0, 1.5 -> 2, -0.5 -> -0, -1.5 -> -2, 10.5 -> 10, 16
    assert q[2:].tolist() == [z + zero.item() for z in (0, 2, 0, -2, 10, 16)]
    _same((q, scale, zero), R.quantize_dynamic(x, EPS))


@needs_cpu
def test_nan_and_inf_take_the_reference_ops():
    # an infinite end makes the grid inf or NaN, whose int8 the vector clamp and ATen differ on
    for at, v in [((0, 1, 2, 3), float("nan")), ((0, 0, 0, 0), float("inf")),
                  ((1, 2, 3, 3), float("inf")), ((0, 0, 0, 0), -float("inf"))]:
        x = torch.randn(2, 3, 4, 4)
        x[at] = v
        _same(torch.ops.synq._quantize_dynamic(x, EPS), R.quantize_dynamic(x, EPS))
    x = torch.randn(3, 40)
    x[0, 0], x[2, 39] = float("inf"), -float("inf")
    _same(torch.ops.synq._quantize_dynamic(x, EPS), R.quantize_dynamic(x, EPS))


@needs_cpu
def test_errors_and_fallback():
    with pytest.raises(RuntimeError, match="non-empty float32"):
        torch.ops.synq._quantize_dynamic(torch.zeros(3, dtype=torch.float64), EPS)
    with pytest.raises(RuntimeError, match="non-empty float32"):
        torch.ops.synq._quantize_dynamic(torch.zeros(0), EPS)
    x = torch.randn(4, 5, dtype=torch.float64)      # the wrapper: the reference's ops
    _same(Q.quantize_dynamic(x, EPS), R.quantize_dynamic(x, EPS))


@needs_cpu
def test_opcheck():
    for x in (torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4).contiguous(
            memory_format=torch.channels_last)):
        torch.library.opcheck(torch.ops.synq._quantize_dynamic.default, (x, EPS))


def test_reference_is_the_exporters_steps():
    # synq.deploy's grid helper for whole tensors gives the same scale and zero
    from synq import deploy, quant
    x = torch.randn(2, 3, 6, 6) * 3 + 1
    scale, zero = deploy._dynamic_grid(x, (0, 1, 2, 3))
    q, s2, z2 = R.quantize_dynamic(x, quant._EPS)
    assert torch.equal(scale, s2) and torch.equal(zero.to(torch.int32), z2)


def _same_rows(a, b):
    # q is contiguous (strides of size-1 dims aside, which the reference's may differ in)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape and u.is_contiguous()
        torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)


def _rows_input(i, gen):
    shapes = [(1, 64), (3, 17), (17, 1), (1000, 7), (2, 513), (16, 512)]
    shape = shapes[i % len(shapes)]
    mag = 10 ** (torch.rand(1, generator=gen).item() * 7 - 4)
    x = torch.randn(shape, generator=gen) * mag
    kind = i % 7
    if kind == 1:
        x[::2] = x[::2].abs() + 0.5          # rows all positive: lo widened to 0
    elif kind == 2:
        x[1::2] = -x[1::2].abs() - 0.1       # rows all negative: hi widened to 0
    elif kind == 3:
        x[0] = 0.0                           # a row at eps
    elif kind == 4:
        x = torch.randn(shape[::-1], generator=gen).t()       # column-major: copied
    elif kind == 5:
        x = torch.randn(shape[0], shape[1] + 3, generator=gen)[:, 1:-2]  # row stride > K
    elif kind == 6:
        x[-1] = 3.7                          # a constant row
    return x


@needs_cpu
def test_rows_match_reference_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    for i in range(84):
        x = _rows_input(i, gen)
        got = torch.ops.synq._quantize_dynamic_rows(x, EPS)
        _same_rows(got, R.quantize_dynamic_rows(x, EPS))
        assert got[1].shape == (x.shape[0], 1)


@needs_cpu
def test_rows_special_values_and_errors():
    inf, nan = float("inf"), float("nan")
    cases = []
    for K in (9, 40):                  # the scalar tail only, and vector body plus tail
        for j, v in [(5, nan), (0, inf), (K - 1, inf), (0, -inf), (3, -inf)]:
            x = torch.randn(4, K)
            x[2, j] = v
            cases.append(x)
        x = torch.randn(4, K)
        x[1, 0], x[1, -1] = inf, -inf
        cases.append(x)
    x = torch.randn(5, 45)[:, 2:42]    # row stride > K, with a NaN
    x[1, 7] = nan
    cases.append(x)
    x = torch.randn(40, 5).t()         # column-major (copied), with a NaN
    x[2, 3] = nan
    cases.append(x)
    cases.append(torch.full((3, 17), -0.0))
    cases.append(torch.tensor([[3e38, -3e38, 1.0], [3.4e38, 0.5, 2.0]]))  # hi - lo overflows
    cases.append(torch.randn(3, 20) * 1e-39)                             # subnormals
    for x in cases:
        _same_rows(torch.ops.synq._quantize_dynamic_rows(x, EPS),
                   R.quantize_dynamic_rows(x, EPS))
    for bad in (torch.zeros(3, 4, dtype=torch.float64), torch.zeros(0, 4), torch.zeros(2, 3, 4)):
        with pytest.raises(RuntimeError, match="non-empty 2-D float32"):
            torch.ops.synq._quantize_dynamic_rows(bad, EPS)
    x = torch.randn(4, 5, dtype=torch.float64)      # the wrapper: the reference's ops
    _same_rows(Q.quantize_dynamic_rows(x, EPS),
               torch.ops.synq._quantize_dynamic_rows(x.float(), EPS))
    torch.library.opcheck(torch.ops.synq._quantize_dynamic_rows.default,
                          (torch.randn(6, 10), EPS))


def test_rows_reference_is_the_exporters_steps():
    # synq.deploy's grid helper over dim 1 and its static quantization give the same values
    from synq import deploy, quant
    x = torch.randn(5, 33) * 3 + 1
    scale, zero = deploy._dynamic_grid(x, (1,))
    q = deploy._quantize_static(x, scale, zero, -128, 127)
    q2, s2, z2 = R.quantize_dynamic_rows(x, quant._EPS)
    assert torch.equal(scale, s2) and torch.equal(zero.to(torch.int32), z2)
    assert torch.equal(q, q2)


@needs_cpu
def test_portable_kernel(tmp_path):
    """The scalar code (SYNQ_CPU_PORTABLE=1, read once per process) gives the same bits."""
    run_portable(__file__, "bit_for_bit or half_to_even", tmp_path, passed=3)

"""synq_kernels.ops.quantize.quantize_static (an activation's grid, optionally after a
per-channel affine map and Hardswish or ReLU: the exporter's static quantization): the CPU
kernel against the reference's PyTorch ops (and F.hardswish, torch.relu), bit for bit, on
awkward shapes, layouts, grids and special values."""
import pytest
import torch
import torch.nn.functional as F

from synq_kernels.ops import quantize as Q
from synq_kernels.reference import quantize as R

needs_cpu = pytest.mark.skipif(not Q._has_kernel(), reason="synq_kernels._C not built")


def _dense(x):
    return (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(
        memory_format=torch.channels_last)) or (x.dim() == 2 and x.t().is_contiguous()))


def _ref(x, scale, zero, lo, hi, act, mul=None, add=None):
    """The exporter's former steps, written out: eval BatchNorm as mul and add per channel,
    F.hardswish or torch.relu, div, round, add, clamp, int8."""
    if mul is not None:
        view = (1, -1) + (1,) * (x.dim() - 2)
        x = torch.add(torch.mul(x, mul.reshape(view)), add.reshape(view))
    if act == 1:
        x = F.hardswish(x)
    elif act == 2:
        x = torch.relu(x)
    t = torch.div(x, scale)
    t.round_().add_(zero).clamp_(lo, hi)
    return t.to(torch.int8)


@needs_cpu
@pytest.mark.parametrize("act", [0, 1, 2])
def test_matches_reference_bit_for_bit(act):
    gen = torch.Generator().manual_seed(act)
    shapes = [(1, 24, 56, 56), (2, 3, 7, 5), (1, 1000), (3, 17), (1, 1, 1, 1), (70001,), (0, 3)]
    for i in range(84):
        shape = shapes[i % len(shapes)]
        mag = 10 ** (torch.rand(1, generator=gen).item() * 6 - 3)
        x = torch.randn(shape, generator=gen) * mag
        if i % 4 == 1 and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        elif i % 4 == 2 and x.dim() == 2:
            x = x.t()                               # dense, not contiguous
        elif i % 4 == 3 and x.dim() >= 2:
            x = x[..., ::2]                         # not dense: copied first
        scale = torch.rand(1, generator=gen) * mag / 20 + 1e-6
        bits = 2 + i % 7
        hi = (1 << bits) - 1 - 128
        zero = torch.randint(-128, hi + 1, (1,), generator=gen, dtype=torch.int32)
        if i % 3 == 0:
            zero = zero.float()                     # the float zero of a dynamic grid
        got = Q.quantize_static(x, scale, zero, -128, hi, act)
        want = _ref(x, scale, zero, -128, hi, act)
        assert got.dtype == torch.int8 and got.shape == want.shape
        assert torch.equal(got, want), (i, shape, act)
        assert torch.equal(R.quantize_static(x, scale, zero, -128, hi, act), want)
        if _dense(x) and x.numel():
            assert [st for st, n in zip(got.stride(), got.shape) if n > 1] == \
                [st for st, n in zip(want.stride(), want.shape) if n > 1]


@needs_cpu
@pytest.mark.parametrize("act", [0, 1, 2])
def test_special_values_and_ties(act):
    inf, nan = float("inf"), float("nan")
    scale, zero = torch.tensor([0.5]), torch.tensor([3], dtype=torch.int32)
    x = torch.tensor([nan, inf, -inf, 0.0, -0.0, 0.25, 0.75, -0.25, -0.75, 1.25, -3.0, 3.0,
                      -2.9999, 1e30, -1e30, 63.0, -70.0, 1e-40] * 3)   # every lane position
    got = Q.quantize_static(x, scale, zero, -100, 60, act)
    assert torch.equal(got, _ref(x, scale, zero, -100, 60, act))
    assert got[0] == 0                                   # NaN: 0, as ATen's conversion
    # round half to even on the ties 0.25 / 0.5 = 0.5 and 0.75 / 0.5 = 1.5
    if not act:
        assert got[5].item() == 3 and got[6].item() == 5 and got[1] == 60 and got[2] == -100


@needs_cpu
def test_odd_grids_and_layouts():
    """Found in review: a fractional or NaN / infinite zero (no exporter grid has one, but
    the op takes any), float64 scales (which promote the ATen steps), and a channel slice
    of a channels-last tensor (not dense: the kernel copies it in the same layout as ATen's
    result)."""
    gen = torch.Generator().manual_seed(3)
    inf, nan = float("inf"), float("nan")
    x = torch.cat([torch.randn(997, generator=gen) * 3,
                   torch.tensor([0.3, -0.3, 0.25, inf, -inf, nan, 0.0, -0.0])])
    grids = [(torch.tensor([0.5]), torch.tensor([0.5])), (torch.tensor([0.07]),
             torch.tensor([-2.75])), (torch.tensor([0.1]), torch.tensor([nan])),
             (torch.tensor([0.1]), torch.tensor([inf])), (torch.tensor([0.1]),
             torch.tensor([-inf])), (torch.tensor([0.013], dtype=torch.float64),
             torch.tensor([4], dtype=torch.int32)), (torch.tensor(0.02), torch.tensor(-7.0)),
            (torch.tensor([0.02]), torch.tensor([5], dtype=torch.int64))]
    for act in (0, 1):
        for scale, zero in grids:
            got = Q.quantize_static(x, scale, zero, -128, 100, act)
            assert torch.equal(got, _ref(x, scale, zero, -128, 100, act)), (scale, zero, act)
    cl = torch.randn(2, 16, 5, 4, generator=gen).contiguous(memory_format=torch.channels_last)
    part = cl[:, :8]
    s, z = torch.tensor([0.03]), torch.tensor([-1], dtype=torch.int32)
    got, want = Q.quantize_static(part, s, z, -128, 127, 1), _ref(part, s, z, -128, 127, 1)
    assert torch.equal(got, want) and got.stride() == want.stride()
    torch.library.opcheck(torch.ops.synq._quantize_static, (part, s, z, -128, 127, 1))


def test_bad_arguments():
    x, s, z = torch.randn(4), torch.tensor([0.1]), torch.tensor([0])
    with pytest.raises(ValueError, match="lo <= hi"):
        Q.quantize_static(x, s, z, 10, -10)
    with pytest.raises(ValueError, match="act must be 0"):
        R.quantize_static(x, s, z, -128, 127, act=3)
    x4, c = torch.randn(2, 3, 4, 4), torch.ones(3)
    with pytest.raises(ValueError, match="together"):
        R.quantize_static(x4, s, z, -128, 127, 0, c, None)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        R.quantize_static(x4, s, z, -128, 127, 0, torch.ones(4), torch.ones(4))
    if Q._has_kernel():
        op = torch.ops.synq._quantize_static
        with pytest.raises(RuntimeError, match="act must be 0"):
            op(x, s, z, -128, 127, 3)
        with pytest.raises(RuntimeError, match="one CPU value"):
            op(x, torch.ones(2), z, -128, 127, 0)
        with pytest.raises(RuntimeError, match="together"):
            op(x4, s, z, -128, 127, 0, c, None)
        with pytest.raises(RuntimeError, match=r"shape \(3,\)"):
            op(x4, s, z, -128, 127, 0, torch.ones(4), torch.ones(4))
        with pytest.raises(RuntimeError, match=r"float32 CPU tensors"):
            op(x4, s, z, -128, 127, 0, c.double(), c.double())
        with pytest.raises(RuntimeError, match="channel dim"):
            op(x, s, z, -128, 127, 0, torch.ones(4), torch.ones(4))


@needs_cpu
@pytest.mark.parametrize("act", [0, 1, 2])
def test_per_channel_affine_bit_for_bit(act):
    """mul / add per channel (an eval BatchNorm folded to x * a + b) before the activation, on
    every layout the kernel walks (rows of channels, planes of one channel) and those it
    copies first, with special values in x, mul and add."""
    gen = torch.Generator().manual_seed(10 + act)
    shapes = [(1, 24, 56, 56), (2, 3, 7, 5), (3, 1, 4, 4), (5, 9, 1, 1), (4, 37), (1, 1000),
              (2, 5, 11), (1, 13, 3, 2, 2), (0, 3, 2, 2)]
    layouts = ["contiguous", "channels_last", "transposed", "slice"]
    inf, nan = float("inf"), float("nan")
    for i in range(len(shapes) * len(layouts)):
        shape, layout = shapes[i % len(shapes)], layouts[i // len(shapes)]
        x = torch.randn(shape, generator=gen) * 3
        if x.numel() > 8:
            x.view(-1)[:6] = torch.tensor([nan, inf, -inf, 0.0, -0.0, 1e30])
        if layout == "channels_last" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "transposed" and x.dim() >= 2:
            x = x.transpose(0, -1).contiguous().transpose(0, -1)   # dense, other order
        elif layout == "slice" and x.dim() >= 2 and x.shape[-1] > 1:
            x = x[..., ::2]
        c = x.shape[1]
        mul = torch.randn(c, generator=gen)
        add = torch.randn(c, generator=gen) * 0.5
        if c > 2:
            mul[0], add[1] = 0.0, -inf
        scale = torch.rand(1, generator=gen) * 0.1 + 1e-3
        zero = torch.randint(-128, 100, (1,), generator=gen, dtype=torch.int32)
        got = Q.quantize_static(x, scale, zero, -128, 100, act, mul, add)
        want = _ref(x, scale, zero, -128, 100, act, mul, add)
        assert got.dtype == torch.int8 and got.shape == want.shape
        assert torch.equal(got, want), (i, shape, layout, act)
        assert torch.equal(R.quantize_static(x, scale, zero, -128, 100, act, mul, add), want)
    # a float64 mul promotes the ATen steps: the reference's path, not the kernel's
    x = torch.randn(2, 4, 3, 3, generator=gen)
    m64, a64 = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    s, z = torch.tensor([0.01]), torch.tensor([0], dtype=torch.int32)
    assert torch.equal(Q.quantize_static(x, s, z, -128, 127, act, m64, a64),
                       _ref(x, s, z, -128, 127, act, m64, a64))


@needs_cpu
def test_per_channel_affine_keeps_dense_layouts():
    """With mul / add, a dense x in a layout the kernel does not walk (transposed, permuted,
    channels-last 3-D) is computed contiguous; the result keeps x's layout, as the fake kernel
    (empty_like) says."""
    gen = torch.Generator().manual_seed(7)
    s, z = torch.tensor([0.02]), torch.tensor([-5], dtype=torch.int32)
    xs = [torch.randn(6, 5, generator=gen).t(),
          torch.randn(2, 3, 4, 5, generator=gen).permute(0, 3, 1, 2),
          torch.randn(2, 3, 4, 5, 6, generator=gen).contiguous(
              memory_format=torch.channels_last_3d)]
    for x in xs:
        c = x.shape[1]
        mul, add = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
        got = Q.quantize_static(x, s, z, -128, 127, 2, mul, add)
        assert got.stride() == torch.empty_like(x, dtype=torch.int8).stride()
        assert torch.equal(got, _ref(x, s, z, -128, 127, 2, mul, add))
        torch.library.opcheck(torch.ops.synq._quantize_static, (x, s, z, -128, 127, 2, mul, add))


@needs_cpu
def test_opcheck():
    x = torch.randn(2, 3, 5, 4).contiguous(memory_format=torch.channels_last)
    for act in (0, 1, 2):
        for affine in ((), (torch.randn(3), torch.randn(3))):
            torch.library.opcheck(torch.ops.synq._quantize_static,
                                  (x, torch.tensor([0.05]), torch.tensor([-3], dtype=torch.int32),
                                   -128, 100, act, *affine))

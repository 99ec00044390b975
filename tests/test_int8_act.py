"""The kernels synq.deploy runs on int8 activations: static quantization of a float32 tensor
(synq_kernels.triton.quantize, on a GPU) and max pooling of int8 (synq_kernels.max_pool2d_int8:
the cpu, reference and triton backends), against the PyTorch ops they replace, bit for bit,
the Triton ones under the interpreter (CPU) and on a GPU where there is one."""
import pytest
import torch
import torch.nn.functional as F

import synq_kernels as sk
from portable import run_portable

TRITON_CPU = "triton" in sk.available_backends("int_mm", "cpu")
GPU = torch.cuda.is_available() and "triton" in sk.available_backends("int_mm", "cuda")
DEVICES = ([pytest.param("cpu", marks=pytest.mark.skipif(not TRITON_CPU, reason="no triton"))]
           + [pytest.param("cuda", marks=pytest.mark.skipif(not GPU, reason="needs a GPU"))])


def _torch_quantize(x, scale, zero, lo, hi):
    """synq.deploy's PyTorch steps."""
    t = torch.div(x, scale)
    t.round_().add_(zero).clamp_(lo, hi)
    return t.to(torch.int8)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_static_matches_the_torch_ops(device):
    """Random values and values next to rounding ties (k + 0.5 steps, one float32 ulp to
    either side), huge and infinite ones, NCHW and channels-last and a transposed 2-D
    tensor, zero points across int8's range, a ReLU grid's (lo, hi) and a capped one."""
    from synq_kernels.triton.quantize import quantize_static
    g = torch.Generator().manual_seed(0)
    for shape, fmt, scale, zero, lo, hi in [
            ((2, 3, 17, 13), torch.contiguous_format, 0.0213, -128, -128, 127),
            ((3, 5, 9, 7), torch.channels_last, 0.37, 5, -128, 127),
            ((1, 1, 1, 1), torch.contiguous_format, 1.0, 0, -128, 127),
            ((33, 31), None, 3e-3, -20, -128, 100)]:
        x = torch.randn(shape, generator=g) * 4
        ties = (torch.randint(-300, 300, shape, generator=g).float() + 0.5) * scale
        pick = torch.randint(0, 4, shape, generator=g)
        x = torch.where(pick == 1, ties, x)
        x = torch.where(pick == 2, torch.nextafter(ties, torch.full_like(ties, 1e9)), x)
        x = torch.where(pick == 3, torch.nextafter(ties, torch.full_like(ties, -1e9)), x)
        x.view(-1)[:4] = torch.tensor([1e30, -1e30, float("inf"), -float("inf")])[:x.numel()]
        x = x.t() if fmt is None else x.contiguous(memory_format=fmt)
        s = torch.tensor(scale, dtype=torch.float32)
        z = torch.tensor(zero, dtype=torch.int32)
        want = _torch_quantize(x, s, z, lo, hi)
        got = quantize_static(x.to(device), s.to(device), z.to(device), lo, hi)
        assert got.dtype == torch.int8 and got.stride() == x.stride(), (shape, got.stride())
        assert torch.equal(got.cpu(), want), (shape, (got.cpu() != want).sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # NumPy on inf / NaN
def test_quantize_static_nan_as_the_torch_ops(device):
    """NaN in x, and the grid of a range with an infinite end (scale inf: inf / inf is NaN;
    zero point from -inf), give what PyTorch's clamp and int8 cast give: 0."""
    from synq_kernels.triton.quantize import quantize_static
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([nan, 1.0, -2.0, inf, -inf, 0.0, 3e38, nan] * 5)
    for scale, zero in [(0.1, 3), (inf, -128), (inf, 0), (1e-8, 127)]:
        s = torch.tensor(scale, dtype=torch.float32)
        z = torch.tensor(zero, dtype=torch.int32)
        want = _torch_quantize(x, s, z, -128, 127)
        got = quantize_static(x.to(device), s.to(device), z.to(device), -128, 127)
        assert torch.equal(got.cpu(), want), (scale, zero, got.cpu()[:8], want[:8])


@pytest.mark.skipif(not TRITON_CPU, reason="no triton")
@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # NumPy on inf / NaN
def test_quantize_static_gpu_division_under_the_interpreter(monkeypatch):
    """The GPU's division (reciprocal and two fused multiply-adds) under the interpreter,
    whose fma rounds twice: a step off at a rare tie at most; a wrong formula is off by many."""
    import synq_kernels.triton as st
    from synq_kernels.triton.quantize import quantize_static
    monkeypatch.setattr(st, "has_fma", lambda device: True)
    x = torch.randn(4, 8, 33, 35, generator=torch.Generator().manual_seed(1)) * 3
    s, z = torch.tensor(0.0173), torch.tensor(-7, dtype=torch.int32)
    diff = (quantize_static(x, s, z, -128, 127).int() - _torch_quantize(x, s, z, -128, 127).int())
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 1e-3
    # special values exactly (double rounding does not touch them): +-inf, an overflowing
    # quotient, NaN, and infinite scales, where the GPU's correction step makes NaN
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([nan, 1.0, -2.0, inf, -inf, 0.0, 3e38, -3e38] * 5)
    for scale, zero in [(0.1, 3), (inf, -128), (inf, 0), (1e-8, 127), (1e-30, -5)]:
        s = torch.tensor(scale, dtype=torch.float32)
        z = torch.tensor(zero, dtype=torch.int32)
        got, want = quantize_static(x, s, z, -128, 127), _torch_quantize(x, s, z, -128, 127)
        assert torch.equal(got, want), (scale, zero, got[:8], want[:8])


@pytest.mark.skipif(not TRITON_CPU, reason="no triton")
def test_quantize_static_refuses_what_it_does_not_take():
    from synq_kernels.triton.quantize import quantize_static, usable
    s, z = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    assert usable(torch.zeros(4, 4), s, z)
    assert not usable(torch.zeros(4, 4, dtype=torch.float16), s, z)
    assert not usable(torch.zeros(4, 8)[:, ::2], s, z)            # not dense
    assert not usable(torch.zeros(4, 4), torch.ones(4), z)        # per-channel scale
    with pytest.raises(ValueError, match="dense float32"):
        quantize_static(torch.zeros(4, 8)[:, ::2], s, z, -128, 127)


def _s2d_reference(q, zero, ph, pw, channels):
    """The space-to-depth layout in PyTorch: q padded with the zero point (to even sizes),
    channel (2 dy + dx) * C + c of pixel (y, x) from padded pixel (2 y + dy, 2 x + dx), the
    zero point in the channels past 4 C."""
    b, c, h, w = q.shape
    h2, w2 = (h + 2 * ph + 1) // 2, (w + 2 * pw + 1) // 2
    pad = F.pad(q.float(), (pw, 2 * w2 - w - pw, ph, 2 * h2 - h - ph), value=float(zero))
    s2d = pad.reshape(b, c, h2, 2, w2, 2).permute(0, 3, 5, 1, 2, 4).reshape(b, 4 * c, h2, w2)
    rest = torch.full((b, channels - 4 * c, h2, w2), float(zero))
    return torch.cat([s2d, rest], 1).to(torch.int8)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_s2d_matches_quantize_then_rearrange(device):
    """quantize_s2d = the PyTorch quantization, padding with the zero point and the
    space-to-depth rearrangement, for 1-4 channels, odd and even padded sizes, any input
    strides; channels-last output."""
    from synq_kernels.triton.quantize import S2D_CHANNELS, quantize_s2d
    g = torch.Generator().manual_seed(3)
    for b, c, h, w, ph, pw, cl in [(2, 3, 15, 13, 3, 3, False), (1, 1, 8, 9, 1, 0, True),
                                   (1, 4, 7, 10, 2, 1, False), (3, 2, 5, 5, 0, 2, True)]:
        x = torch.randn(b, c, h, w, generator=g) * 2
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        s, z = torch.tensor(0.021), torch.tensor(-9, dtype=torch.int32)
        want = _s2d_reference(_torch_quantize(x, s, z, -128, 127), -9, ph, pw, S2D_CHANNELS)
        got = quantize_s2d(x.to(device), s.to(device), z.to(device), -128, 127, (ph, pw))
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert got.shape == want.shape and torch.equal(got.cpu(), want), (b, c, h, w, ph, pw)
    with pytest.raises(ValueError, match="C <= 4"):
        quantize_s2d(torch.zeros(1, 5, 4, 4, device=device), s.to(device), z.to(device), -128,
                     127, (1, 1))


# (B, C, H, W, kernel, stride, padding, dilation, ceil_mode, channels_last)
POOL_CASES = [(2, 64, 17, 15, 3, 2, 1, 1, False, True),    # ResNet-18's, odd sizes
              (1, 5, 12, 12, 3, 2, 1, 1, True, True),
              (2, 3, 9, 11, (2, 3), (1, 2), (1, 1), (1, 1), True, False),
              (1, 130, 7, 8, 2, None, 0, 1, False, True),
              (1, 4, 13, 10, 3, 2, 1, 2, True, False),    # dilated
              (1, 7, 5, 5, 5, 3, 2, 1, True, True),
              (1, 3, 5, 6, 2, 2, 1, 1, True, True)]    # ceil_mode's last window dropped


POOL_BACKENDS = ([("cpu", "cpu")] if "cpu" in sk.available_backends("max_pool2d_int8", "cpu")
                 else []) + [("cpu", "reference")] + [
    pytest.param("cpu", "triton", marks=pytest.mark.skipif(not TRITON_CPU, reason="no triton")),
    pytest.param("cuda", "triton", marks=pytest.mark.skipif(not GPU, reason="needs a GPU")),
    pytest.param("cuda", "reference", marks=pytest.mark.skipif(not GPU, reason="needs a GPU"))]


def _pool_input(g, b, c, h, w, cl):
    x = torch.randint(-128, 128, (b, c, h, w), dtype=torch.int8, generator=g)
    x[..., 0, 0] = -128          # a window whose maximum is int8's least
    return x.contiguous(memory_format=torch.channels_last) if cl else x


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
def test_max_pool2d_int8_matches_torch(device, backend):
    """F.max_pool2d on the values as float32 (exact), cast back: values, shape and memory
    format, on awkward shapes, ceil_mode, dilation and padding up to half the kernel."""
    g = torch.Generator().manual_seed(2)
    for b, c, h, w, k, s, p, d, ceil, cl in POOL_CASES:
        x = _pool_input(g, b, c, h, w, cl)
        want = F.max_pool2d(x.float(), k, s, p, d, ceil_mode=ceil).to(torch.int8)
        got = sk.max_pool2d_int8(x.to(device), k, s, p, d, ceil, backend=backend)
        assert got.shape == want.shape, (b, c, h, w, k, s, p, d, ceil, got.shape, want.shape)
        assert got.is_contiguous(memory_format=torch.channels_last if cl and c > 1
                                 else torch.contiguous_format)
        assert torch.equal(got.cpu(), want), (b, c, h, w, k, s, p, d, ceil)


NEEDS_CPU_POOL = pytest.mark.skipif(
    "cpu" not in sk.available_backends("max_pool2d_int8", "cpu"), reason="no cpu kernels")


@NEEDS_CPU_POOL
def test_max_pool2d_int8_cpu_layouts():
    """The cpu kernel's two loops (channels-last pixels with 32-channel vectors and a scalar
    tail; planes for other strides) on channel counts around the vector width, strided views
    (a channel slice, a spatial slice, a transpose), and one channel."""
    g = torch.Generator().manual_seed(3)
    views = []
    for c in (1, 2, 31, 32, 33, 64, 95, 129):
        views.append(_pool_input(g, 2, c, 11, 9, True))
        views.append(_pool_input(g, 1, c, 10, 13, False))
    big = _pool_input(g, 2, 80, 12, 12, True)
    views += [big[:, 7:70], big[:, :, 1:10, 2:], big[:, :, ::2], big.transpose(2, 3),
              _pool_input(g, 3, 48, 9, 9, False)[:, ::3]]
    for x in views:
        for k, s, p, d, ceil in [(3, 2, 1, 1, False), (2, 2, 0, 1, True), (3, 1, 1, 2, False),
                                 ((1, 4), (3, 1), (0, 2), (1, 1), True)]:
            want = F.max_pool2d(x.float(), k, s, p, d, ceil_mode=ceil).to(torch.int8)
            got = sk.max_pool2d_int8(x, k, s, p, d, ceil, backend="cpu")
            assert torch.equal(got, want), (tuple(x.shape), x.stride(), k, s, p, d, ceil)


@NEEDS_CPU_POOL
def test_max_pool2d_int8_cpu_portable(tmp_path):
    """The scalar code (SYNQ_CPU_PORTABLE=1, read once per process) on the same cases."""
    run_portable(__file__, "max_pool2d_int8_cpu_layouts or max_pool2d_int8_matches_torch "
                 "and cpu-cpu", tmp_path, passed=2)


def test_max_pool2d_int8_bad_input():
    with pytest.raises(ValueError, match="int8"):
        sk.max_pool2d_int8(torch.zeros(1, 2, 4, 4), 2)
    with pytest.raises(ValueError, match="int8"):
        sk.max_pool2d_int8(torch.zeros(2, 4, 4, dtype=torch.int8), 2)
    with pytest.raises(ValueError, match="half the kernel"):
        sk.max_pool2d_int8(torch.zeros(1, 2, 8, 8, dtype=torch.int8), 3, 1, 2)
    with pytest.raises(ValueError, match="positive"):
        sk.max_pool2d_int8(torch.zeros(1, 2, 8, 8, dtype=torch.int8), 3, 0)
    with pytest.raises(ValueError, match="output size"):
        sk.max_pool2d_int8(torch.zeros(1, 2, 2, 2, dtype=torch.int8), 3)
    with pytest.raises(TypeError, match="kernel_size"):
        sk.max_pool2d_int8(torch.zeros(1, 2, 8, 8, dtype=torch.int8), 2.5)
    with pytest.raises(ValueError, match="not a backend"):
        sk.max_pool2d_int8(torch.zeros(1, 2, 8, 8, dtype=torch.int8), 2, backend="gpu")
    empty = torch.zeros(0, 3, 8, 8, dtype=torch.int8)
    assert sk.max_pool2d_int8(empty, 2).shape == (0, 3, 4, 4)


_AOT_SCRIPT = r"""
import synq_kernels.triton.pool as P
import synq_kernels.triton.quantize as Q

for cc in (80, 90):  # an A100 and an H100
    # quantize: 16-byte loads of float32 and one division a thread (the reciprocal), two fused
    # multiply-adds a value
    ptx = build(Q._quantize_kernel, {"x_ptr": "*fp32", "out_ptr": "*i8", "s_ptr": "*fp32",
                                     "z_ptr": "*i32", "n": "i32", "lo": "fp32", "hi": "fp32"},
                {"HW_FMA": True, "BLOCK": Q.BLOCK}, aligned=["x_ptr", "out_ptr", "n"],
                num_warps=4, cc=cc)
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), "float32 loads not vectorized"
    assert ptx.count("div.rn.f32") == 1 and len(re.findall(r"fma\.rn\.f32", ptx)) >= 2 * 16
    # space-to-depth: each pixel's 16 int8 channels in one 16-byte store
    ints = ["H", "W", "H2", "W2", "sxb", "sxc", "sxh", "sxw", "soh", "pad_h", "pad_w"]
    ptx = build(Q._quantize_s2d_kernel, {"x_ptr": "*fp32", "out_ptr": "*i8", "s_ptr": "*fp32",
                                         "z_ptr": "*i32", "lo": "fp32", "hi": "fp32",
                                         **{a: "i32" for a in ints}},
                {"C": 3, "CO": Q.S2D_CHANNELS, "HW_FMA": True, "BLOCK": 2048},
                aligned=["x_ptr", "out_ptr", "sxb", "sxc", "sxh", "soh"], num_warps=4, cc=cc)
    stores = re.findall(r"st\.global(\.v[24])?\.b(8|16|32)\b", ptx)
    assert stores and set(stores) == {(".v4", "32")}, sorted(set(stores))
    # max-pool on a channels-last int8 tensor (channel stride 1, a constant at launch): each
    # window position's channels in 16-byte loads
    ints = ["P", "C", "OHW", "OW", "H", "W", "sxb", "sxh", "sxw", "sob", "soh", "sow", "sh",
            "sw", "ph", "pw", "dh", "dw"]
    ptx = build(P._max_pool_kernel,
                {"x_ptr": "*i8", "out_ptr": "*i8", **{a: "i32" for a in ints}},
                {"sxc": 1, "soc": 1, "KH": 3, "KW": 3, "BP": 32, "BC": 64},
                aligned=["x_ptr", "out_ptr", "C", "sxb", "sxh", "sxw", "sob", "soh", "sow"],
                num_warps=4, cc=cc)
    loads = re.findall(r"ld\.global(?:\.\w+)*\.(v4\.b32|b8|u8|s8)", ptx)
    assert loads and set(loads) == {"v4.b32"}, sorted(set(loads))
print("ok")
"""


@pytest.mark.skipif(not TRITON_CPU, reason="no triton")
def test_int8_act_kernels_compile_for_sm80_and_sm90():
    """The interpreter hides GPU-only compile errors: the kernels compiled ahead of time for
    sm_80 and sm_90 (no GPU needed), with the memory accesses that make them one pass."""
    import triton_aot
    triton_aot.run(_AOT_SCRIPT)

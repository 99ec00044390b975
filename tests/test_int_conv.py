"""quantized_conv2d: layer shapes of ResNet-20, ResNet-18 and MobileNetV2 (small batch),
integer accumulators bit-exact against an int64 unfold computation (exact_conv, for every
backend; unit scales make the float32 output the accumulator itself), float epilogues against
float64 from it, NCHW / channels-last / strided input, errors, opcheck, torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import synq_kernels as sk

CPU_BACKENDS = [b for b in ("cpu",) if b in sk.available_backends("quantized_conv2d", "cpu")]
BACKENDS = ["reference"] + CPU_BACKENDS

# (name, batch, C, H, W, Cout, k, stride, padding, groups)
LAYERS = [
    ("resnet20.stem", 2, 3, 32, 32, 16, 3, 1, 1, 1),
    ("resnet20.block1", 2, 16, 32, 32, 16, 3, 1, 1, 1),
    ("resnet20.down2", 2, 16, 32, 32, 32, 3, 2, 1, 1),
    ("resnet20.shortcut3", 2, 32, 16, 16, 64, 1, 2, 0, 1),
    ("resnet18.stem", 1, 3, 64, 64, 64, 7, 2, 3, 1),
    ("resnet18.layer1", 1, 64, 28, 28, 64, 3, 1, 1, 1),
    ("resnet18.layer3.down", 1, 128, 14, 14, 256, 3, 2, 1, 1),
    ("resnet18.layer4", 1, 512, 7, 7, 512, 3, 1, 1, 1),
    ("mobilenetv2.dw32", 2, 32, 28, 28, 32, 3, 1, 1, 32),
    ("mobilenetv2.dw96.s2", 1, 96, 28, 28, 96, 3, 2, 1, 96),
    ("mobilenetv2.expand", 2, 16, 28, 28, 96, 1, 1, 0, 1),
    ("mobilenetv2.project", 2, 96, 14, 14, 24, 1, 1, 0, 1),
]


def rand_i8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


def layer_inputs(b, c, h, w, cout, k, groups):
    return rand_i8(b, c, h, w), rand_i8(cout, c // groups, k, k)


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(t) for t in v)


def exact_conv(x_q, x_zero, w_q, stride, padding, dilation=1, groups=1):
    """Ground truth in int64: conv of (x_q - x_zero), zero padded, by unfold (independent of
    the library; stride, padding, dilation an int or a pair)."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    xc = (x_q.to(torch.int64) - int(x_zero))
    b, c, h, w = xc.shape
    cout, cg, kh, kw = w_q.shape
    cols = F.unfold(xc.to(torch.float64), (kh, kw), dilation, padding, stride)  # exact
    cols = cols.round().to(torch.int64).reshape(b, groups, cg * kh * kw, -1)
    wg = w_q.to(torch.int64).reshape(groups, cout // groups, -1)
    out = torch.einsum("gok,bgkp->bgop", wg, cols).reshape(b, cout, -1)
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return out.reshape(b, cout, oh, ow)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", LAYERS, ids=[l[0] for l in LAYERS])
def test_layer_accumulators_exact(backend, layer):
    _, b, c, h, w, cout, k, s, p, g = layer
    x_q, w_q = layer_inputs(b, c, h, w, cout, k, g)
    xz = 7
    y = sk.quantized_conv2d(x_q, 1.0, xz, w_q, 1.0, stride=s, padding=p, groups=g,
                            backend=backend)
    want = exact_conv(x_q, xz, w_q, s, p, groups=g)  # every backend, the reference too
    assert y.dtype == torch.float32 and y.shape == want.shape
    assert int(want.abs().max()) < 2 ** 24  # the float32 output holds the accumulator exactly
    assert torch.equal(y.to(torch.int64), want)


def float64_conv(x_q, xs, xz, w_q, ws, bias, relu, stride=1, padding=0, dilation=1, groups=1):
    """The exact value in float64 (accumulator from exact_conv) and its magnitude before
    bias / ReLU."""
    acc = exact_conv(x_q, xz, w_q, stride, padding, dilation, groups).to(torch.float64)
    v = acc * xs * ws.to(torch.float64).reshape(1, -1, 1, 1)
    b64 = bias.to(torch.float64).reshape(1, -1, 1, 1) if bias is not None else 0
    y = v + b64
    mag = v.abs() + (b64.abs() if bias is not None else 0)
    return (y.clamp_min(0) if relu else y), mag


def assert_epilogue_close(y, want, mag, out_dtype):
    """float32 epilogue: int32 -> float, scale product and bias add round once each (4 ulps
    of the terms' magnitude), then one rounding to out_dtype."""
    tol = 4 * torch.finfo(torch.float32).eps * mag + torch.finfo(out_dtype).eps * want.abs()
    # below out_dtype's smallest normal the spacing is fixed (float16: 2^-24), not relative
    tol = tol + torch.finfo(out_dtype).smallest_normal * torch.finfo(out_dtype).eps / 2
    err = (y.to(torch.float64) - want).abs()
    assert y.dtype == out_dtype
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max()):.3g}"


def assert_rounded_from_float32(y, y32):
    """A float16 / bfloat16 output is the same backend's float32 output rounded to nearest
    even, bit for bit (and in the same memory format): assert_epilogue_close's half-ulp
    allowance alone would also pass a cast that truncates (rounds toward zero)."""
    assert y32.dtype == torch.float32 and y.shape == y32.shape
    if y.dtype != torch.float32:
        bad = y != y32.to(y.dtype)
        assert not bad.any(), \
            f"{int(bad.sum())} of {y.numel()} {y.dtype} outputs are not the float32 ones rounded"


def conv_epilogue_cases(cases):
    """Random quantized_conv2d inputs per (B, C, H, W, Cout, k, stride, padding, dilation,
    groups): uint8 x on odd cases, int8 on even; bias except on the third; ReLU on even
    cases. Tuples (x_q, x_zero, w_q, w_scale, bias, relu, stride, padding, dilation, groups)."""
    for i, (b, c, h, w, cout, k, s, p, d, g) in enumerate(cases):
        x_u8 = i % 2 == 1
        x_q = (torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8) if x_u8
               else rand_i8(b, c, h, w))
        w_q = rand_i8(cout, c // g, k, k)
        ws = torch.rand(cout) * 0.01 + 0.001
        bias = torch.randn(cout) * 5 if i != 2 else None
        yield x_q, 131 if x_u8 else -9, w_q, ws, bias, i % 2 == 0, s, p, d, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_epilogue(backend, out_dtype):
    cases = [(2, 16, 15, 13, 24, 3, 2, 1, 1, 1), (1, 32, 9, 9, 32, 3, 1, 2, 2, 32),
             (2, 24, 8, 8, 12, 1, 1, 0, 1, 4), (1, 8, 11, 7, 6, 5, 3, 2, 2, 2)]
    for x_q, xz, w_q, ws, bias, relu, s, p, d, g in conv_epilogue_cases(cases):
        kw = dict(stride=s, padding=p, dilation=d, groups=g, relu=relu, backend=backend)
        y = sk.quantized_conv2d(x_q, 0.05, xz, w_q, ws, bias, out_dtype=out_dtype, **kw)
        want, mag = float64_conv(x_q, 0.05, xz, w_q, ws, bias, relu, stride=(s, s),
                                 padding=(p, p), dilation=(d, d), groups=g)
        assert_epilogue_close(y, want, mag, out_dtype)
        if out_dtype != torch.float32:  # grouped, depthwise and dense cases alike
            y32 = sk.quantized_conv2d(x_q, 0.05, xz, w_q, ws, bias, **kw)
            assert_rounded_from_float32(y, y32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_formats_and_strides(backend):
    x_q, w_q = rand_i8(2, 16, 12, 10), rand_i8(8, 16, 3, 3)
    ws = torch.rand(8) + 0.5
    want, mag = float64_conv(x_q, 0.1, 2, w_q, ws, None, False, stride=(2, 1), padding=(1, 2))
    cl = x_q.contiguous(memory_format=torch.channels_last)
    y = sk.quantized_conv2d(cl, 0.1, 2, w_q, ws, stride=(2, 1), padding=(1, 2), backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_epilogue_close(y, want, mag, torch.float32)
    big = rand_i8(2, 32, 14, 12)
    strided = big[:, ::2, 1:13, 1:11]            # (2, 16, 12, 10), not contiguous
    want, mag = float64_conv(strided, 0.1, 2, w_q, ws, None, False, padding=1)
    y = sk.quantized_conv2d(strided, 0.1, 2, w_q, ws, padding=1, backend=backend)
    assert y.is_contiguous()
    assert_epilogue_close(y, want, mag, torch.float32)


def test_errors():
    x, w = rand_i8(1, 8, 6, 6), rand_i8(4, 8, 3, 3)
    with pytest.raises(ValueError, match=r"groups = 3 must divide the input channels \(8\)"):
        sk.quantized_conv2d(x, 0.1, 0, rand_i8(6, 2, 3, 3), 0.1, groups=3)
    with pytest.raises(ValueError, match="expected 4 input channels per group"):
        sk.quantized_conv2d(x, 0.1, 0, w, 0.1, groups=2)
    with pytest.raises(TypeError, match="x_q must have dtype int8 or uint8, got torch.int32"):
        sk.quantized_conv2d(x.int(), 0.1, 0, w, 0.1)
    with pytest.raises(TypeError, match="packed int4 conv weights are not supported"):
        sk.quantized_conv2d(x, 0.1, 0, torch.zeros(4, 8, 3, 2, dtype=torch.uint8), 0.1)
    with pytest.raises(ValueError, match=r"w_scale must be a scalar or have shape \(4,\)"):
        sk.quantized_conv2d(x, 0.1, 0, w, torch.ones(3))
    with pytest.raises(ValueError, match="per-tensor"):
        sk.quantized_conv2d(x, torch.ones(2), 0, w, 0.1)
    with pytest.raises(ValueError, match="does not fit"):
        sk.quantized_conv2d(rand_i8(1, 8, 2, 2), 0.1, 0, w, 0.1)
    with pytest.raises(ValueError, match="stride and dilation must be >= 1"):
        sk.quantized_conv2d(x, 0.1, 0, w, 0.1, stride=0)
    with pytest.raises(ValueError, match="w_scale must be positive"):
        sk.quantized_conv2d(x, 0.1, 0, w, torch.tensor([1.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, w = rand_i8(2, 4, 7, 5), rand_i8(6, 2, 3, 3)
    args = (x, torch.tensor(0.1), torch.tensor(3, dtype=torch.int32), w, torch.rand(6) + 0.1,
            sk.weight_row_sums(w), torch.randn(6), [2, 1], [1, 1], [1, 2], 2, True,
            torch.float16, backend)
    torch.library.opcheck(torch.ops.synq.quantized_conv2d.default, args)
    cl = (x.contiguous(memory_format=torch.channels_last),) + args[1:]
    torch.library.opcheck(torch.ops.synq.quantized_conv2d.default, cl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_calls_skip_the_op_layer_modes_see_it(backend):
    """Plain eager calls run the op's body directly; under a dispatch mode (fake tensors,
    tracing, synq.replay's recorder) the custom op is what runs, with the same result."""
    from op_spy import OpSpy

    g = torch.Generator().manual_seed(4)
    x = torch.randint(-128, 128, (2, 6, 9, 9), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (4, 3, 3, 3), dtype=torch.int8, generator=g)
    args = (x, 0.02, -3, w, torch.rand(4, generator=g) + 0.1, torch.randn(4, generator=g))
    kw = dict(padding=1, groups=2, relu=True, backend=backend)
    direct = sk.quantized_conv2d(*args, **kw)
    with OpSpy() as spy:
        seen = sk.quantized_conv2d(*args, **kw)
    assert "synq.quantized_conv2d.default" in spy.ops
    assert torch.equal(direct, seen)
    want, mag = float64_conv(x, 0.02, -3, w, args[4], args[5], True, padding=1, groups=2)
    assert_epilogue_close(direct, want, mag, torch.float32)


def test_torch_compile_fullgraph():
    w = rand_i8(8, 4, 3, 3)
    ws = torch.rand(8) + 0.1

    def block(x):
        x_q = torch.clamp(torch.round(x / 0.05), -128, 127).to(torch.int8)
        return sk.quantized_conv2d(x_q, 0.05, 0, w, ws, padding=1, relu=True).sum(1)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(compiled(x), block(x))


# -- Triton -------------------------------------------------------------------------------------
# On CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without
# a GPU). Gated on int_mm so that a quantized_conv2d missing from the triton backend fails.
TRITON = ["triton"] if "triton" in sk.available_backends("int_mm", "cpu") else []


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("layer", LAYERS, ids=[l[0] for l in LAYERS])
def test_triton_layer_accumulators_exact(backend, layer):
    _, b, c, h, w, cout, k, s, p, g = layer
    x_q, w_q = layer_inputs(b, c, h, w, cout, k, g)
    want = exact_conv(x_q, 7, w_q, s, p, groups=g)
    y = sk.quantized_conv2d(x_q, 1.0, 7, w_q, 1.0, stride=s, padding=p, groups=g,
                            backend=backend)
    assert y.dtype == torch.float32 and y.is_contiguous()
    assert torch.equal(y.to(torch.int64), want)
    if s == 1 and g == 1:
        return
    # stride-2 and depthwise layers again on channels-last input, with ReLU (unit scales: the
    # output is the accumulator clamped at 0)
    cl = x_q.contiguous(memory_format=torch.channels_last)
    y = sk.quantized_conv2d(cl, 1.0, 7, w_q, 1.0, stride=s, padding=p, groups=g, relu=True,
                            backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.to(torch.int64), want.clamp_min(0))


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("fast_div", [True, False])
def test_triton_depthwise_row_split(backend, fast_div, monkeypatch):
    """The depthwise kernel's output rows split into (batch, y, x) by float reciprocals
    (fast_div) or integer division (past FAST_DIV_ROWS rows): odd sizes, stride, dilation,
    padding, two output channels per group, NCHW and channels-last, exact."""
    from synq_kernels.triton import conv_tap as T
    if not fast_div:
        monkeypatch.setattr(T, "FAST_DIV_ROWS", 0)
    for b, c, h, w, mult, k, s, p, d, cl in [(3, 5, 11, 7, 1, 3, 2, 1, 1, False),
                                             (2, 6, 9, 13, 2, 3, 1, 2, 2, True),
                                             (1, 4, 5, 3, 1, 5, 3, 2, 1, True)]:
        x_q, w_q = rand_i8(b, c, h, w), rand_i8(c * mult, 1, k, k)
        if cl:
            x_q = x_q.contiguous(memory_format=torch.channels_last)
        geom = dict(stride=(s, s), padding=(p, p), dilation=(d, d), groups=c)
        want = exact_conv(x_q, -5, w_q, **geom)
        y = sk.quantized_conv2d(x_q, 1.0, -5, w_q, 1.0, backend=backend, **geom)
        assert torch.equal(y.to(torch.int64), want), (b, c, h, w, mult, k, s, p, d, cl)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_float_epilogue(backend, out_dtype):
    test_float_epilogue(backend, out_dtype)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_memory_formats_and_strides(backend):
    test_memory_formats_and_strides(backend)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_int4_weights(backend):
    """The triton kernels also take packed int4 conv weights (the op does not yet): (Cout,
    ceil(K / 2)) in (ky, kx, c) order; implicit GEMM, grouped and depthwise, NCHW and
    channels-last."""
    from synq_kernels.triton import int_gemm as T
    cases = [(2, 16, 16, 16, 32, 3, 2, 1, 1, 1, True), (1, 64, 7, 7, 24, 3, 1, 1, 1, 1, False),
             (1, 8, 11, 7, 6, 5, 3, 2, 2, 2, True), (2, 32, 14, 14, 32, 3, 2, 1, 1, 32, False),
             (1, 8, 9, 9, 16, 3, 1, 1, 1, 8, True), (1, 3, 12, 12, 5, 7, 2, 3, 1, 1, False)]
    for i, (b, c, h, w, cout, k, s, p, d, g, cl) in enumerate(cases):
        x_q = rand_i8(b, c, h, w)
        if cl:
            x_q = x_q.contiguous(memory_format=torch.channels_last)
        w4 = torch.randint(-8, 8, (cout, c // g, k, k), dtype=torch.int8)
        packed = sk.pack_int4(w4.permute(0, 2, 3, 1).reshape(cout, -1))
        geom = dict(stride=(s, s), padding=(p, p), dilation=(d, d), groups=g)
        xz = torch.tensor(9, dtype=torch.int32)
        y = T.conv2d(x_q, torch.tensor(1.0), xz, packed, torch.ones(cout),
                     sk.weight_row_sums(w4), None, relu=False, out_dtype=torch.float32,
                     w_packed=True, kernel_size=(k, k), **geom)
        want = exact_conv(x_q, 9, w4, **geom)
        assert torch.equal(y.to(torch.int64), want), (b, c, h, w, cout, k, s, p, d, g)
        if i % 2:  # the float epilogue on half the cases (GEMM and depthwise both)
            continue
        ws, bias = torch.rand(cout) * 0.01 + 0.001, torch.randn(cout)
        y = T.conv2d(x_q, torch.tensor(0.05), xz, packed, ws, sk.weight_row_sums(w4), bias,
                     relu=True, out_dtype=torch.float16, w_packed=True, kernel_size=(k, k),
                     **geom)
        want, mag = float64_conv(x_q, 0.05, 9, w4, ws, bias, True, **geom)
        assert_epilogue_close(y, want, mag, torch.float16)
        y32 = T.conv2d(x_q, torch.tensor(0.05), xz, packed, ws, sk.weight_row_sums(w4), bias,
                       relu=True, out_dtype=torch.float32, w_packed=True, kernel_size=(k, k),
                       **geom)
        assert_rounded_from_float32(y, y32)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_low_precision_outputs_round_to_nearest(backend):
    # float16 / bfloat16 outputs are the kernel's own float32 result rounded to nearest even
    # (the interpreter's bfloat16 cast alone would truncate); implicit GEMM and depthwise
    for c, cout, g in ((16, 24, 1), (16, 16, 16)):
        x_q, w_q = layer_inputs(2, c, 9, 9, cout, 3, g)
        args = (x_q, 0.021, -5, w_q, torch.rand(cout) * 0.02, torch.randn(cout))
        y32 = sk.quantized_conv2d(*args, padding=1, groups=g, relu=True, backend=backend)
        for dt in (torch.bfloat16, torch.float16):
            y = sk.quantized_conv2d(*args, padding=1, groups=g, relu=True, out_dtype=dt,
                                    backend=backend)
            assert torch.equal(y, y32.to(dt)), (g, dt)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_opcheck(backend):
    test_opcheck(backend)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("fast_div", [True, False])
def test_triton_tap_kernel_ragged_channels_groups_and_strides(backend, fast_div, monkeypatch):
    """The tap-blocked implicit GEMM (channels per group >= TAP_MIN_CHANNELS): channel counts
    that no K block divides (a masked channel tail per tap), two groups, dilation, stride,
    padding past the kernel's reach, channels-last / NCHW / a strided view, against the exact
    integer reference; then the epilogue on one case. fast_div False: row indices split by
    integer division (the kernel's path past FAST_DIV_ROWS output pixels)."""
    from synq_kernels.triton import conv_tap as T
    if not fast_div:
        monkeypatch.setattr(T, "FAST_DIV_ROWS", 0)
    for b, c, h, w, cout, k, s, p, d, g, fmt in [
            (2, 80, 9, 11, 24, 3, 1, 1, 1, 2, "cl"),      # Cg 40, Og 12
            (1, 33, 13, 6, 70, 3, 2, 2, 2, 1, "nchw"),    # Cg 33, ragged Og tile
            (3, 64, 7, 7, 40, 1, 2, 0, 1, 1, "view"),     # 1x1 stride 2 on a strided view
            (1, 160, 5, 5, 16, 5, 1, 4, 1, 1, "cl")]:     # padding 4 of a 5x5: taps all pad
        assert c // g >= T.TAP_MIN_CHANNELS
        x_q, w_q = layer_inputs(b, c, h, w, cout, k, g)
        if fmt == "cl":
            x_q = x_q.contiguous(memory_format=torch.channels_last)
        elif fmt == "view":
            x_q = rand_i8(b, c, h, 2 * w)[..., ::2]
        geom = dict(stride=(s, s), padding=(p, p), dilation=(d, d), groups=g)
        want = exact_conv(x_q, -3, w_q, **geom)
        y = sk.quantized_conv2d(x_q, 1.0, -3, w_q, 1.0, backend=backend, **geom)
        assert torch.equal(y.to(torch.int64), want), (c, cout, k, s, p, d, g, fmt)
    ws, bias = torch.rand(cout) * 0.01 + 0.001, torch.randn(cout)
    y = sk.quantized_conv2d(x_q, 0.05, -3, w_q, ws, bias, relu=True, backend=backend, **geom)
    want, mag = float64_conv(x_q, 0.05, -3, w_q, ws, bias, True, **geom)
    assert_epilogue_close(y, want, mag, torch.float32)


_AOT_SCRIPT = r"""
import synq_kernels.triton.conv_tap as m

ints = ["P", "OHW", "OW", "H", "W", "Cg", "Og", "KW", "K", "TAPS", "n_kb",
        "n_tiles", "sxb", "sxc", "sxh", "sxw", "swn", "swc", "swy", "swx", "sob", "soc", "soh",
        "sow", "srb", "src", "srh", "srw", "scb", "scg", "sch", "scw", "sh", "sw", "ph", "pw",
        "dh", "dw"]
f32, i32 = "*fp32", "*i32"
base = {"x_ptr": "*i8", "w_ptr": "*i8", "xs_ptr": f32, "xz_ptr": i32, "zp_ptr": "*i8",
        "ws_ptr": f32, "rs_ptr": i32, "bias_ptr": f32, "off_ptr": i32, "cs_ptr": i32,
        "rsc_ptr": f32, "rzp_ptr": i32, "osc_ptr": f32, "ozp_ptr": i32, "out_hi": "fp32",
        "inv_ohw": "fp32", "inv_ow": "fp32",
        **{a: "i32" for a in ints}}
aligned = ["x_ptr", "w_ptr", "zp_ptr", "out_ptr", "Cg", "Og", "sxb", "sxh", "sxw", "swn", "swy",
           "swx", "sob", "soh", "sow"]
# the plain conv (float32 out), the fused one (offset term, int8 residual, int8 out), the
# flattened-K mode of a 3-channel 7x7 stem (fused, no residual), and packed int4 weights
for bm, bn, bk, warps, fused, flat, packed in [(128, 128, 128, 8, False, False, False),
                                               (64, 128, 64, 4, True, False, False),
                                               (128, 64, 32, 4, True, True, False),
                                               (128, 64, 64, 4, False, True, True)]:
    # (the packed case writes bfloat16, rounded in float32 bits first)
    sig = dict(base, out_ptr="*i8" if fused else ("*bf16" if packed else f32),
               res_ptr="*i8" if fused else f32, w_ptr="*u8" if packed else "*i8")
    consts = {"HAS_BIAS": True, "HAS_OFFSET": fused, "RES_MODE": 2 if fused and not flat else 0,
              "RELU": True, "OUT_Q": fused, "ROUND_BF16": packed, "FLAT": flat, "RUN": False,
              "CG": 3 if flat else 0, "KWC": 7 if flat else 0, "W_PACKED": packed,
              "FAST_DIV": not packed, "HW_FMA": True, "EVEN_K": fused and not flat,
              "BM": bm, "BN": bn, "BK": bk}
    ptx = build(m._conv_tap_kernel, sig, consts, aligned, num_warps=warps, cc=90, num_stages=3)
    mma = re.findall(r"(?:wgmma\.mma_async|mma\.sync)\S*", ptx)
    assert mma and all("s8.s8" in x for x in mma), (bm, bn, bk, sorted(set(mma))[:3])
    # A from shared memory (a descriptor after the accumulators), not registers: a select on
    # the A tile's values (the old padding) made Triton load it back into registers
    a_src = re.findall(r"wgmma\.mma_async\S*\s*\{[^}]*\},\s*([{%])", ptx)
    assert a_src and set(a_src) == {"%"}, (bm, bn, bk, fused, flat, a_src)
    # requantization y / out_scale: one IEEE division a thread (the reciprocal), then two
    # fused multiply-adds a value (a div.rn a value was about ten SASS instructions, a range
    # check and a slow-path call site each: 64 a thread at this tile)
    assert ptx.count("div.rn.f32") == int(fused) and not re.search(r"div\.(full|approx)", ptx)
    assert not fused or len(re.findall(r"fma\.rn\.f32", ptx)) >= 2 * bm * bn // (32 * warps)
    # an A100 (sm_80, no wgmma) compiles the same kernel to mma.sync s8
    ptx = build(m._conv_tap_kernel, sig, consts, aligned, num_warps=warps, cc=80, num_stages=3)
    mma = re.findall(r"mma\.sync\S*", ptx)
    assert mma and all("s8.s8" in x for x in mma), (bm, bn, bk, sorted(set(mma))[:3])
print("ok")
"""


_AOT_SPILL_SCRIPT = r"""
import torch
import synq_kernels.triton.conv_tap as m

# Each conv runs through conv_tap's own launcher code with the kernel replaced by a recorder;
# the recorded arguments are then specialized the way Triton's launcher does (an int equal to
# 1 becomes a constant, a multiple of 16 and a 16-byte aligned pointer are marked so) and
# compiled for sm_90 with the launch's warps and stages.
kernel, calls = m._conv_tap_kernel, []


class Recorder:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: calls.append((args, kwargs))


def i8(*shape):
    t = torch.randint(-128, 128, shape, dtype=torch.int8)
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


one = lambda v, dt=torch.float32: torch.tensor([v], dtype=dt)  # noqa: E731
m._conv_tap_kernel = Recorder()
gpu_config = m._tap_config  # the GPU's tiles for these CPU tensors, not the interpreter's
m._tap_config = lambda p, cg, og, taps, interp, *modes: gpu_config(p, cg, og, taps, False,
                                                                    *modes)
# exported-model convs, fused (offset term, bias, ReLU, int8 out, int8 residual for a block's
# second conv), at batch sizes that give the large-P tiles: ResNet-18's stem, layer1 / layer3 /
# layer4 block convs and a downsample; ResNet-20's 1-channel stem and a 16-channel block conv
for b, c, h, cout, k, s, p, res in [(1, 3, 224, 64, 7, 2, 3, False), (2, 64, 56, 64, 3, 1, 1, True),
                                    (32, 256, 14, 256, 3, 1, 1, True),
                                    (128, 512, 7, 512, 3, 1, 1, True),
                                    (32, 128, 28, 256, 1, 2, 0, False),
                                    (8, 1, 28, 16, 3, 1, 1, False), (8, 16, 28, 16, 3, 1, 1, True)]:
    x, w = i8(b, c, h, h), i8(cout, c, k, k)
    oh = (h + 2 * p - k) // s + 1
    m.fused_conv2d(x, one(0.02), one(3, torch.int32), w, torch.rand(cout) + 0.1,
                   torch.zeros(cout, dtype=torch.int32), torch.randn(cout), (s, s), (p, p),
                   (1, 1), 1, True, offset=torch.zeros(cout, dtype=torch.int32),
                   residual=i8(b, cout, oh, oh) if res else None, res_scale=one(0.03),
                   res_zero=one(-128, torch.int32), out_scale=one(0.05),
                   out_zero=one(-128, torch.int32))
m._conv_tap_kernel = kernel
PTR = {torch.int8: "*i8", torch.uint8: "*u8", torch.int32: "*i32", torch.float32: "*fp32"}
for args, kwargs in calls:
    sig, consts, aligned = {}, {}, []
    for name, v in zip(kernel.arg_names, args):
        if isinstance(v, torch.Tensor):
            sig[name] = PTR[v.dtype]
            if v.data_ptr() % 16 == 0:
                aligned.append(name)
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            consts[name] = 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                aligned.append(name)
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    consts.update(kwargs)
    consts["HW_FMA"] = True  # the GPU's epilogue (CPU tensors record the interpreter's)
    r = resources(kernel, sig, consts, aligned, **opts)
    what = (args[22:27], consts["FLAT"], consts["RUN"], consts["RES_MODE"],
            {k: consts[k] for k in ("BM", "BN", "BK")}, opts, r)
    # a spill in the main loop is local-memory traffic at every K block (the stem at 4 warps:
    # 101 local loads per block); a few in the epilogue are cheap
    assert r["loop_spills"] == 0 and r["stack"] <= 64, what
    # operands in asynchronous 16-byte copies: both of them tap-blocked (a 1x1 conv's weight
    # was 64 one-byte loads a thread and K block), the weight in the flattened-K and
    # window-row modes, whose A elements each have their own window position
    assert r["loop_copies"] is None or (  # None: one K block, no loop
        r["loop_copies"] > 0 and (consts["FLAT"] or consts["RUN"] or r["loop_loads"] == 0)), what
    # tap-blocked with BK dividing the channels: unmasked copies and unsigned window checks,
    # 111-148 instructions a K block (Triton 3.6 / 3.8), against 137-184 with a mask on every
    # copy and four signed compares a row
    assert (consts["FLAT"] or consts["RUN"] or not consts["EVEN_K"]
            or r["loop_instructions"] is None or r["loop_instructions"] <= 160), what
    print(*what)
print("ok")
"""


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_triton_conv_default_tiles_do_not_spill():
    """The tiles _tap_config picks, with the fused epilogue of an exported model, compile for
    sm_90 without spilling in the main loop, and at most 64 bytes a thread elsewhere (the
    flattened-K mode computes a window position and mask per A element, the fused epilogue
    holds an int8 residual: both cost registers); the operands reach shared memory in
    asynchronous copies."""
    import triton_aot
    triton_aot.run(_AOT_SPILL_SCRIPT)


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_triton_tap_kernel_compiles_to_int8_mma_for_sm90():
    """The interpreter hides GPU-only compile errors: the tap-blocked conv kernel compiled
    ahead of time for sm_90 (no GPU needed), its products int8 tensor-core MMAs that read
    both operands from shared memory."""
    import triton_aot
    triton_aot.run(_AOT_SCRIPT)

# Triton on CUDA tensors (a GPU machine; skipped here): the interpreter runs the same kernels
# above, but only a GPU runs the compiled code. Named *cuda* so that benchmarks/gpu_check.sh's
# `-k cuda` selects them; few shapes, since every new constexpr combination is a JIT compile.
TRITON_GPU = [pytest.param("triton", marks=pytest.mark.skipif(
    not torch.cuda.is_available() or "triton" not in sk.available_backends("int_mm", "cuda"),
    reason="needs a CUDA GPU and triton"))]


def triton_conv_cases(device, backend="triton"):
    """Implicit GEMM (small and wide channel tiles, grouped + dilated) and depthwise, NCHW and
    channels-last: accumulators exactly (unit scales), then the epilogue against float64."""
    for b, c, h, w, cout, k, s, p, d, g, cl, out_dtype in [
            (2, 16, 32, 32, 32, 3, 2, 1, 1, 1, True, torch.float16),      # resnet20.down2
            (1, 512, 7, 7, 512, 3, 1, 1, 1, 1, False, torch.float32),     # resnet18.layer4
            (1, 96, 28, 28, 96, 3, 2, 1, 1, 96, True, torch.bfloat16),    # mobilenetv2 dw s2
            (1, 8, 11, 7, 6, 5, 3, 2, 2, 2, False, torch.float32)]:
        x_q, w_q = layer_inputs(b, c, h, w, cout, k, g)
        fmt = torch.channels_last if cl else torch.contiguous_format
        xd = x_q.to(device).contiguous(memory_format=fmt)
        geom = dict(stride=(s, s), padding=(p, p), dilation=(d, d), groups=g)
        y = sk.quantized_conv2d(xd, 1.0, 7, w_q.to(device), 1.0, backend=backend, **geom)
        want = exact_conv(x_q, 7, w_q, **geom)
        assert y.device.type == device and y.is_contiguous(memory_format=fmt)
        assert torch.equal(y.cpu().to(torch.int64), want), (c, cout, k, s, g)
        ws, bias = torch.rand(cout) * 0.01 + 0.001, torch.randn(cout)
        args = (xd, 0.05, -9, w_q.to(device), ws.to(device), bias.to(device))
        y = sk.quantized_conv2d(*args, relu=True, out_dtype=out_dtype, backend=backend, **geom)
        want, mag = float64_conv(x_q, 0.05, -9, w_q, ws, bias, True, **geom)
        assert_epilogue_close(y.cpu(), want, mag, out_dtype)
        y32 = sk.quantized_conv2d(*args, relu=True, backend=backend, **geom)
        assert_rounded_from_float32(y.cpu(), y32.cpu())


@pytest.mark.parametrize("backend", TRITON_GPU)
def test_triton_cuda_conv2d(backend):
    triton_conv_cases("cuda", backend)


# -- CUDA backend (csrc/cuda/int_gemm.cu; skipped without a GPU) --------------------------------

CUDA_OK = torch.cuda.is_available() and "cuda" in sk.available_backends("quantized_conv2d",
                                                                         "cuda")
CUDA = [pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA_OK, reason="needs a CUDA GPU and synq_kernels._C built with its CUDA kernels"))]


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("layer", LAYERS, ids=[l[0] for l in LAYERS])
def test_cuda_layer_accumulators_exact(backend, layer, channels_last):
    # NCHW: K ordered (c, ky, kx), gathered byte by byte; channels-last: (ky, kx, c), 16
    # channels per load when C / groups is a multiple of 16; depthwise: the direct kernel
    _, b, c, h, w, cout, k, s, p, g = layer
    x_q, w_q = layer_inputs(b, c, h, w, cout, k, g)
    xz = 7
    xd = x_q.cuda()
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    y = sk.quantized_conv2d(xd, 1.0, xz, w_q.cuda(), 1.0, stride=s, padding=p, groups=g,
                            backend=backend)
    want = exact_conv(x_q, xz, w_q, s, p, groups=g)
    assert y.is_cuda and y.dtype == torch.float32 and y.shape == want.shape
    assert torch.equal(y.cpu().to(torch.int64), want)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_float_epilogue(backend, out_dtype):
    cases = [(2, 16, 15, 13, 24, 3, 2, 1, 1, 1), (1, 32, 9, 9, 32, 3, 1, 2, 2, 32),
             (2, 24, 8, 8, 12, 1, 1, 0, 1, 4), (1, 8, 11, 7, 6, 5, 3, 2, 2, 2),
             (3, 64, 10, 10, 200, 3, 1, 1, 1, 1), (1, 32, 12, 12, 64, 3, 1, 1, 1, 2)]
    for i, (x_q, xz, w_q, ws, bias, relu, s, p, d, g) in enumerate(conv_epilogue_cases(cases)):
        want, mag = float64_conv(x_q, 0.05, xz, w_q, ws, bias, relu, stride=(s, s),
                                 padding=(p, p), dilation=(d, d), groups=g)
        for fmt in (torch.contiguous_format, torch.channels_last):
            xd = x_q.cuda().contiguous(memory_format=fmt)
            y = sk.quantized_conv2d(xd, 0.05, xz, w_q.cuda(), ws.cuda(),
                                    bias.cuda() if bias is not None else None, stride=s,
                                    padding=p, dilation=d, groups=g, relu=relu,
                                    out_dtype=out_dtype, backend=backend)
            assert y.is_contiguous(memory_format=fmt)
            assert_epilogue_close(y.cpu(), want, mag, out_dtype)
            y32 = sk.quantized_conv2d(xd, 0.05, xz, w_q.cuda(), ws.cuda(),
                                      bias.cuda() if bias is not None else None, stride=s,
                                      padding=p, dilation=d, groups=g, relu=relu,
                                      backend=backend)
            assert_rounded_from_float32(y.cpu(), y32.cpu())
            if CPU_BACKENDS:  # the same float32 expression as the cpu backend
                y_cpu = sk.quantized_conv2d(x_q.contiguous(memory_format=fmt), 0.05, xz, w_q,
                                            ws, bias, stride=s, padding=p, dilation=d,
                                            groups=g, relu=relu, out_dtype=out_dtype,
                                            backend="cpu")
                assert torch.equal(y.cpu(), y_cpu), (i, fmt)


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_memory_formats_and_strides(backend):
    x_q, w_q = rand_i8(2, 16, 12, 10), rand_i8(8, 16, 3, 3)
    ws = torch.rand(8) + 0.5
    want = sk.quantized_conv2d(x_q, 0.1, 2, w_q, ws, stride=(2, 1), padding=(1, 2),
                               backend="reference")
    cl = x_q.cuda().contiguous(memory_format=torch.channels_last)
    y = sk.quantized_conv2d(cl, 0.1, 2, w_q.cuda(), ws.cuda(), stride=(2, 1), padding=(1, 2),
                            backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.cpu(), want, rtol=1e-6, atol=1e-5)
    big = rand_i8(2, 32, 14, 12)
    strided = big[:, ::2, 1:13, 1:11]            # (2, 16, 12, 10), not contiguous
    want = sk.quantized_conv2d(strided.contiguous(), 0.1, 2, w_q, ws, padding=1,
                               backend="reference")
    y = sk.quantized_conv2d(strided.cuda(), 0.1, 2, w_q.cuda(), ws.cuda(), padding=1,
                            backend=backend)
    torch.testing.assert_close(y.cpu(), want, rtol=1e-6, atol=1e-5)
    # channels-last slices: channel runs that start off a 16-byte boundary
    big = rand_i8(2, 40, 9, 9).cuda().contiguous(memory_format=torch.channels_last)
    sl = big[:, 3:35]                            # (2, 32, 9, 9), channel stride 1
    w2 = rand_i8(24, 32, 3, 3)
    y = sk.quantized_conv2d(sl, 1.0, -3, w2.cuda(), 1.0, padding=1, backend=backend)
    want = exact_conv(sl.cpu(), -3, w2, 1, 1)
    assert torch.equal(y.cpu().to(torch.int64), want)


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_opcheck(backend):
    x, w = rand_i8(2, 4, 7, 5).cuda(), rand_i8(6, 2, 3, 3).cuda()
    args = (x, torch.tensor(0.1).cuda(), torch.tensor(3, dtype=torch.int32).cuda(), w,
            torch.rand(6).cuda() + 0.1, sk.weight_row_sums(w), torch.randn(6).cuda(), [2, 1],
            [1, 1], [1, 2], 2, True, torch.float16, backend)
    torch.library.opcheck(torch.ops.synq.quantized_conv2d.default, args)
    cl = (x.contiguous(memory_format=torch.channels_last),) + args[1:]
    torch.library.opcheck(torch.ops.synq.quantized_conv2d.default, cl)

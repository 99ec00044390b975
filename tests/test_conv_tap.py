"""synq_kernels.triton.conv_tap: the fused (requantizing) conv that an exported model runs on
a GPU, in its tap-blocked, window-row and flattened-K modes. Under the Triton interpreter (CPU)
its epilogue must equal, bit for bit,
the same float32 steps in PyTorch on the exact integer accumulator; on a GPU (fused
multiply-adds) the int8 outputs may differ by one step at rounding ties."""
import numpy as np
import pytest
import torch

import synq_kernels as sk
from synq_kernels.reference import int_gemm as R

TRITON_CPU = "triton" in sk.available_backends("int_mm", "cpu")
GPU = torch.cuda.is_available() and "triton" in sk.available_backends("int_mm", "cuda")
DEVICES = ([pytest.param("cpu", marks=pytest.mark.skipif(not TRITON_CPU, reason="no triton"))]
           + [pytest.param("cuda", marks=pytest.mark.skipif(not GPU, reason="needs a GPU"))])

# (B, C, H, W, Cout, k, stride, padding, dilation, groups, channels_last)
CASES = [(2, 32, 8, 7, 24, 3, 1, 1, 1, 1, True),
         (1, 80, 9, 9, 30, 3, 2, 1, 1, 2, False),
         (2, 40, 6, 6, 16, 1, 1, 0, 1, 1, True),
         (1, 64, 7, 5, 48, 3, 1, 2, 2, 1, True),
         # fewer than 32 channels per group: the window-row mode or the flattened-K one (a
         # 7x7 stride-2 stem, a grouped, dilated conv with 8 channels per group, a 16-channel
         # NCHW one whose window row (48) leaves a ragged block of 64, a 1-channel 3x3)
         (2, 3, 15, 13, 20, 7, 2, 3, 1, 1, True),
         (1, 16, 9, 9, 24, 3, 1, 2, 2, 2, False),
         (1, 16, 10, 11, 20, 3, 2, 1, 1, 1, False),
         (2, 1, 9, 8, 16, 3, 1, 1, 1, 1, True)]


def _expected(x, xs, xz, w, ws, bias, offset, relu, res, rscale, rzero, oscale, ozero, hi, geom):
    """The epilogue's steps in float32 PyTorch on the exact integer sums."""
    acc = R.quantized_conv2d_int(x, xz, w, **geom).to(torch.int64)
    if offset is not None:
        ones = torch.ones_like(w)
        win = R.quantized_conv2d_int(x, xz, ones, **geom).to(torch.int64)
        acc = acc + win * offset.to(torch.int64).reshape(1, -1, 1, 1)
    y = acc.float() * (xs * ws).reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
    if res is not None:
        y = y + ((res.float() - rzero.float()) * rscale if res.dtype == torch.int8 else res)
    if relu:
        y = y.clamp_min(0.0)
    if oscale is None:
        return y
    return (torch.div(y, oscale).round() + ozero.float()).clamp(-128, hi).to(torch.int8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("small_mode", ["auto", "flat", "run"])
def test_fused_epilogue(device, small_mode, monkeypatch):
    """Every epilogue variant on each case; convs with fewer than 32 channels per group in the
    mode conv2d_tap picks (auto), or all in the flattened-K mode, or all whose window row
    fits a block (<= 64) in the window-row mode."""
    _check_fused(device, small_mode, monkeypatch, exact=device == "cpu")


@pytest.mark.skipif(not TRITON_CPU, reason="no triton")
def test_fused_epilogue_gpu_division_under_the_interpreter(monkeypatch):
    """The GPU's requantizing division (a reciprocal and two fused multiply-adds) run by the
    interpreter, whose fma rounds twice: a step off at a rare tie at most, where a wrong
    formula is off by many (exactness itself: the test below and the GPU run)."""
    import synq_kernels.triton as st
    monkeypatch.setattr(st, "has_fma", lambda device: True)
    _check_fused("cpu", "auto", monkeypatch, exact=False)


def test_reciprocal_division_is_ieee():
    """The kernel's y / s on a GPU: inv = RN(1 / s), q = RN(y * inv), e = y - q * s and
    RN(q + e * inv) by fused multiply-adds (emulated exactly with fractions here) equals
    float32 IEEE division, on random quotients and on ones next to rounding ties."""
    from fractions import Fraction

    f32 = np.float32

    def fma(a, b, c):  # a * b + c rounded once to float32, ties to even
        x = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
        v = f32(float(x))
        near = [np.nextafter(v, f32(-np.inf)), v, np.nextafter(v, f32(np.inf))]
        return min(near, key=lambda t: (abs(Fraction(float(t)) - x),
                                        int(t.view(np.uint32)) & 1))

    rng = np.random.default_rng(0)
    for i in range(4000):
        s = f32(10 ** rng.uniform(-5, 1))
        if i % 2:  # y / s at or one ulp from k + 0.5, where rounding the quotient decides
            y = f32((int(rng.integers(-300, 300)) + 0.5) * float(s))
            y = np.nextafter(y, f32(np.inf if i % 4 == 1 else -np.inf)) if i % 8 < 4 else y
        else:
            y = f32(rng.normal() * 10 ** rng.uniform(-6, 4))
        inv = f32(1) / s
        q = f32(y * inv)
        got = fma(fma(-q, s, y), inv, q)
        assert got == y / s, (y, s, got, y / s)


def _check_fused(device, small_mode, monkeypatch, exact):
    """The fused conv on CASES against _expected: bit for bit where `exact`, else int8 outputs
    a step off at a rare tie and float ones close."""
    from synq_kernels.triton import conv_tap
    monkeypatch.setattr(conv_tap, "RUN_K_RANGE", {"auto": conv_tap.RUN_K_RANGE,
                                                  "flat": (0, 0), "run": (1, 64)}[small_mode])
    g = torch.Generator().manual_seed(0)
    variants = [(o, r, q) for o in (False, True) for r in (None, "float", "int8")
                for q in (False, True)]
    for i, (b, c, h, w_, cout, k, s, p, d, grp, cl) in enumerate(CASES):
        x = torch.randint(-128, 128, (b, c, h, w_), dtype=torch.int8, generator=g)
        w = torch.randint(-128, 128, (cout, c // grp, k, k), dtype=torch.int8, generator=g)
        geom = dict(stride=(s, s), padding=(p, p), dilation=(d, d), groups=grp)
        oh, ow = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w_ + 2 * p - d * (k - 1) - 1) // s + 1
        xs, xz = torch.tensor([0.031]), torch.tensor([-5], dtype=torch.int32)
        ws = torch.rand(cout, generator=g) * 2e-3 + 1e-4
        bias = torch.randn(cout, generator=g) * 0.5
        for j, (use_off, res_kind, quant) in enumerate(variants[i::2]):
            offset = (torch.randint(-60, 60, (cout,), dtype=torch.int32, generator=g)
                      if use_off else None)
            res = rsc = rzp = None
            if res_kind == "float":
                res = torch.randn(b, cout, oh, ow, generator=g)
            elif res_kind == "int8":
                res = torch.randint(-128, 100, (b, cout, oh, ow), dtype=torch.int8, generator=g)
                rsc, rzp = torch.tensor([0.07]), torch.tensor([-20], dtype=torch.int32)
            osc, ozp, hi = ((torch.tensor([0.05]), torch.tensor([-100], dtype=torch.int32), 100)
                            if quant else (None, None, 127))
            relu = j % 2 == 0
            want = _expected(x, xs, xz, w, ws, bias, offset, relu, res, rsc, rzp, osc, ozp, hi,
                             geom)
            fmt = torch.channels_last if cl else torch.contiguous_format
            dev = lambda t: None if t is None else t.to(device)  # noqa: E731
            got = conv_tap.fused_conv2d(
                x.to(device).contiguous(memory_format=fmt), dev(xs), dev(xz), dev(w), dev(ws),
                dev(sk.weight_row_sums(w)), dev(bias), geom["stride"], geom["padding"],
                geom["dilation"], grp, relu, dev(offset), dev(res), dev(rsc), dev(rzp), dev(osc),
                dev(ozp), hi).cpu()
            what = (i, use_off, res_kind, quant, relu)
            assert got.dtype == want.dtype and got.shape == want.shape, what
            if exact:
                assert torch.equal(got, want), what
            elif quant:   # fused multiply-adds: one step off at a rounding tie, rarely
                diff = (got.int() - want.int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, what
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="residual"):
        conv_tap.fused_conv2d(x.to(device), dev(xs), dev(xz), dev(w), dev(ws),
                              dev(sk.weight_row_sums(w)), None, geom["stride"],
                              geom["padding"], geom["dilation"], grp, False,
                              residual=torch.zeros(1, 1, 1, 1, device=device))


@pytest.mark.skipif(not TRITON_CPU, reason="no triton")
@pytest.mark.parametrize("bits", [8, 4])
def test_exported_model_on_the_fused_path(monkeypatch, bits):
    """The exported ResNet-20 with its wide convs on the fused path (forced on the CPU, under
    the interpreter) against the CPU's own prepacked path: the same integer model, so the
    logits agree up to float rounding in the epilogues (an int8 activation one step off)."""
    import synq.deploy as D
    from synq.models import resnet20
    from synq.quant import calibrate, quantize_model
    torch.manual_seed(1)
    model = resnet20(num_classes=10, in_channels=1)
    x = torch.randn(4, 1, 28, 28)
    im = D.export(calibrate(quantize_model(model, bits, bits), [x]), example=x[:1])
    im.replay = False
    # both ways of the offset term are taken: in the kernel (int8 rows stored with an
    # offset) and folded into the weight once (packed int4 rows, _tap_weight)
    layers = [m for m in im.int_layers().values() if isinstance(m, D.IntConv2d)]
    assert any(m.offset is not None for m in layers)
    assert all(m.packed == (bits == 4) for m in layers)
    want = im(x)
    used = []
    real = D.IntConv2d._conv_tap

    def spy(self, *a):
        used.append(self.name)
        return real(self, *a)
    monkeypatch.setattr(D.IntConv2d, "_use_tap", lambda self, xq: (
        self.in_channels // self.groups > 1))
    monkeypatch.setattr(D.IntConv2d, "_conv_tap", spy)
    got = im(x)
    assert len(used) >= 18, used     # every conv but the 1-channel stem
    scale = want.abs().max()
    assert (got - want).abs().max() <= 0.02 * scale, ((got - want).abs().max(), scale)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_fast_row_division_is_exact_below_2_pow_22():
    """The kernel's row split (FAST_DIV): floor(n / d) as int(float32(n + 0.5) * float32(1/d))
    in float32 arithmetic, at both sides of every multiple of every divisor d <= 2000 for
    n < FAST_DIV_ROWS (a one-off run checked every d <= 300000 the same way)."""
    import numpy as np
    from synq_kernels.triton.conv_tap import FAST_DIV_ROWS
    for d in range(1, 2001):
        r = np.float32(1.0 / d)
        k = np.arange(0, FAST_DIV_ROWS // d + 2, dtype=np.int64)
        n = np.concatenate([k * d - 1, k * d])
        n = n[(n >= 0) & (n < FAST_DIV_ROWS)]
        got = ((n.astype(np.float32) + np.float32(0.5)) * r).astype(np.int64)
        assert np.array_equal(got, n // d), d


@pytest.mark.skipif(not TRITON_CPU, reason="no triton")
@pytest.mark.parametrize("c", [16, 64])   # window-row mode, tap-blocked
def test_cache_keeps_the_weight_and_zero_page_while_unchanged(c):
    """With a cache dict (what an exported layer passes), a second call derives nothing from
    w or x_zero again (no reorder, pad, cast or copy of them), and an in-place change of
    either is seen: the results equal an uncached call's each time."""
    from op_spy import OpSpy

    from synq_kernels.triton import conv_tap
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-128, 128, (1, c, 9, 9), dtype=torch.int8, generator=g).contiguous(
        memory_format=torch.channels_last)
    w = torch.randint(-128, 128, (8, c, 3, 3), dtype=torch.int8, generator=g)
    xs, xz = torch.tensor([0.03]), torch.tensor([-5], dtype=torch.int32)
    ws = torch.rand(8, generator=g) * 1e-3

    def conv(cache):
        return conv_tap.fused_conv2d(x, xs, xz, w, ws, sk.weight_row_sums(w), None, (1, 1),
                                     (1, 1), (1, 1), 1, True, cache=cache)

    cache = {}
    assert torch.equal(conv(cache), conv(None))
    derive = {"aten.permute.default", "aten.constant_pad_nd.default", "aten._to_copy.default",
              "aten.expand.default", "aten.clone.default"}
    for kept, want in [(None, True), (cache, False)]:
        with OpSpy() as spy:
            conv(kept)
        assert bool(derive & set(spy.ops)) == want, (kept is None, sorted(set(spy.ops)))
    for change in (lambda: xz.fill_(17), lambda: w[0].neg_()):
        change()
        assert torch.equal(conv(cache), conv(None))


@pytest.mark.skipif(not TRITON_CPU, reason="no triton")
def test_space_to_depth_stem_gives_the_same_conv():
    """A stride-2 conv of <= 4 channels, run as its space-to-depth form (quantize_s2d's input,
    s2d_weight's weight, stride 1, no padding) equals the conv on the int8 input, bit for bit:
    with and without the offset term (extra window positions stored as -offset), fused
    requantization, odd sizes, kernels 3, 5 and 7."""
    from synq_kernels.triton import conv_tap
    from synq_kernels.triton.quantize import S2D_CHANNELS, quantize_s2d
    g = torch.Generator().manual_seed(7)
    for b, c, h, w_, cout, k, p, use_off in [(2, 3, 15, 13, 24, 7, 3, True),
                                             (1, 1, 9, 8, 16, 3, 1, False),
                                             (1, 4, 11, 11, 8, 5, 2, True),
                                             (1, 2, 10, 7, 12, 7, 3, False)]:
        x = torch.randn(b, c, h, w_, generator=g)
        s, z = torch.tensor(0.013), torch.tensor(-20, dtype=torch.int32)
        t = torch.div(x, s)
        xq = t.round_().add_(z).clamp_(-128, 127).to(torch.int8)
        w = torch.randint(-128, 128, (cout, c, k, k), dtype=torch.int8, generator=g)
        offset = (torch.randint(-60, 60, (cout,), dtype=torch.int32, generator=g)
                  if use_off else None)
        ws, bias = torch.rand(cout, generator=g) * 1e-3, torch.randn(cout, generator=g)
        osc, ozp = torch.tensor([0.04]), torch.tensor([-128], dtype=torch.int32)
        want = conv_tap.fused_conv2d(xq, s.reshape(1), z.reshape(1), w, ws,
                                     sk.weight_row_sums(w), bias, (2, 2), (p, p), (1, 1), 1,
                                     True, offset, out_scale=osc, out_zero=ozp)
        w2 = conv_tap.s2d_weight(w, offset, S2D_CHANNELS)
        x2 = quantize_s2d(x, s, z, -128, 127, (p, p))
        got = conv_tap.fused_conv2d(x2, s.reshape(1), z.reshape(1), w2, ws,
                                    sk.weight_row_sums(w2), bias, (1, 1), (0, 0), (1, 1), 1,
                                    True, offset, out_scale=osc, out_zero=ozp)
        assert got.shape == want.shape and torch.equal(got, want), (c, h, w_, k, p, use_off)
    # a stored value that would leave int8: no space-to-depth weight
    assert conv_tap.s2d_weight(w, torch.full((cout,), -128, dtype=torch.int32),
                               S2D_CHANNELS) is None

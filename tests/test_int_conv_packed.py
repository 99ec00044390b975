"""quantized_conv2d_packed (prepacked weights, float or requantized int8 / uint8 output, fused
residual) against its reference, bit-exact: the reference follows the kernel's float32
operation order, so every output dtype, the int8 ones included, must match exactly."""
import math
import os
import subprocess
import sys

import pytest
import torch

import synq_kernels as sk
from synq_kernels.ops import int_gemm as G
from synq_kernels.reference import int_gemm as R

HAS_CPU = "cpu" in sk.available_backends("quantized_conv2d", "cpu")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="synq_kernels._C not built")

# (name, batch, C, H, W, Cout, k, stride, padding, dilation, groups)
CASES = [
    ("r20.stem", 2, 1, 28, 28, 16, 3, 1, 1, 1, 1),
    ("r20.block1", 3, 16, 28, 28, 16, 3, 1, 1, 1, 1),
    ("r20.down2", 1, 16, 28, 28, 32, 3, 2, 1, 1, 1),
    ("r20.shortcut2", 2, 16, 28, 28, 32, 1, 2, 0, 1, 1),
    ("r20.block3", 1, 64, 7, 7, 64, 3, 1, 1, 1, 1),
    ("odd", 2, 3, 11, 9, 24, 5, 2, 2, 1, 1),
    ("stem.3ch", 1, 3, 5, 37, 8, 3, 2, 1, 1, 1),     # NCHW rows of 16-pixel runs + a tail
    ("wide.20ch", 1, 20, 3, 35, 16, 3, 1, 1, 1, 1),   # planes into 5 quads a pixel
    ("dilated", 1, 6, 13, 10, 20, 3, (2, 1), (2, 3), (2, 3), 1),
    ("grouped", 2, 8, 9, 9, 12, 3, 1, 1, 1, 2),
    ("grouped.8", 1, 16, 7, 8, 20, 3, 1, 1, 1, 2),     # 8 channels a group: shared image
    ("grouped.6", 1, 12, 7, 7, 8, 3, 2, 1, 1, 2),      # 6: not quads, one group at a time
    ("depthwise", 1, 5, 8, 8, 5, 3, 1, 1, 1, 5),
    ("depthwise.32.s2", 2, 32, 9, 9, 32, 3, 2, 1, 1, 32),
    ("depthwise.40.dilated", 1, 40, 10, 11, 40, 5, 1, (2, 3), (2, 1), 40),
    ("depthwise.144.s2", 1, 144, 11, 9, 144, 3, 2, 1, 1, 144),  # 9 blocks: 4 pairs + 1
    # 3x3 rows kernel (dw_rows.h): a pair with a partial second block; a pair and a partial
    # half; runs of 1-8 pixels along rows of 19 and 10; no padding; stride 2, odd sizes
    ("depthwise.24.s1", 2, 24, 6, 19, 24, 3, 1, 1, 1, 24),
    ("depthwise.40.s1.pad0", 1, 40, 7, 12, 40, 3, 1, 0, 1, 40),
    ("depthwise.64.s2.odd", 1, 64, 13, 21, 64, 3, 2, 1, 1, 64),
    ("depthwise.x2", 1, 6, 7, 7, 12, 3, 1, 1, 1, 6),   # 2 outputs per channel: grouped path
]


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _args(case, x_dtype, out_dtype, residual, cl, seed=0):
    _, b, c, h, w, cout, k, s, p, d, g = case
    gen = torch.Generator().manual_seed(seed)
    if x_dtype == torch.uint8:
        x = torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=gen)
        xz = 117
    else:
        x = torch.randint(-128, 128, (b, c, h, w), dtype=torch.int8, generator=gen)
        xz = -5
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    wq = torch.randint(-128, 128, (cout, c // g, k, k), dtype=torch.int8, generator=gen)
    ws = torch.rand(cout, generator=gen) * 0.01 + 0.001
    bias = torch.randn(cout, generator=gen)
    s, p, d = _pair(s), _pair(p), _pair(d)
    oh = G.conv_out_size(h, k, s[0], p[0], d[0])
    ow = G.conv_out_size(w, k, s[1], p[1], d[1])
    kw = {}
    if out_dtype in (torch.int8, torch.uint8):
        kw["out_scale"] = 0.37
        kw["out_zero"] = -3 if out_dtype == torch.int8 else 20
    # the residual follows x's layout: channels-last takes the vector epilogue, NCHW the
    # strided one
    fmt = torch.channels_last if cl else torch.contiguous_format
    if residual == "float":
        kw["residual"] = torch.randn(b, cout, oh, ow, generator=gen).contiguous(
            memory_format=fmt)
    elif residual in ("int8", "uint8"):
        lo, hi = (-128, 128) if residual == "int8" else (0, 256)
        r = torch.randint(lo, hi, (b, cout, oh, ow), generator=gen).to(
            torch.int8 if residual == "int8" else torch.uint8)
        kw.update(residual=r.contiguous(memory_format=fmt),
                  residual_scale=0.05, residual_zero=4 if residual == "int8" else 130)
    return x, xz, wq, ws, bias, dict(stride=s, padding=p, dilation=d, groups=g,
                                     out_dtype=out_dtype, **kw)


def _run(case, x_dtype, out_dtype, residual, cl, relu, threads=None, hardswish=False):
    x, xz, wq, ws, bias, kw = _args(case, x_dtype, out_dtype, residual, cl)
    if hardswish:
        kw["hardswish"] = True
    outs = []
    for be in ("reference", "cpu"):
        wp = sk.prepack_conv2d_weight(wq, kw["groups"], backend=be)
        old = torch.get_num_threads()
        if threads and be == "cpu":
            torch.set_num_threads(threads)
        try:
            outs.append(sk.quantized_conv2d_packed(x, 0.02, xz, wp, ws, bias, relu=relu,
                                                   backend=be, **kw))
        finally:
            torch.set_num_threads(old)
    return outs


@needs_cpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_prepack_matches_reference(case):
    _, b, c, h, w, cout, k, s, p, d, g = case
    wq = torch.randint(-128, 128, (cout, c // g, k, k), dtype=torch.int8)
    wp = sk.prepack_conv2d_weight(wq, g)
    assert torch.equal(wp, R.conv2d_prepack(wq, g))
    assert torch.equal(R.conv2d_unpack(wp, cout, c // g), wq)


@needs_cpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.int8, torch.uint8])
def test_exact_vs_reference(case, out_dtype):
    for i, (x_dtype, residual, cl) in enumerate([(torch.int8, None, True),
                                                 (torch.uint8, "int8", False),
                                                 (torch.int8, "float", True),
                                                 (torch.uint8, "uint8", True)]):
        ref, got = _run(case, x_dtype, out_dtype, residual, cl, relu=i % 2 == 0)
        assert got.dtype == out_dtype and got.shape == ref.shape
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, ref), f"variant {i}"


@needs_cpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.int8, torch.uint8])
def test_hardswish_exact_vs_reference(case, out_dtype):
    """Hardswish in the epilogue (MobileNetV3's conv -> BN -> Hardswish), on every kernel
    path: vector and strided epilogues, the depthwise rows kernel, residuals."""
    for i, (x_dtype, residual, cl) in enumerate([(torch.int8, None, True),
                                                 (torch.uint8, "int8", False),
                                                 (torch.int8, "float", True)]):
        ref, got = _run(case, x_dtype, out_dtype, residual, cl, relu=False, hardswish=True)
        plain, _ = _run(case, x_dtype, out_dtype, residual, cl, relu=False)
        assert got.dtype == out_dtype and got.shape == ref.shape
        assert torch.equal(got, ref), f"variant {i}"
        assert not torch.equal(ref, plain)      # (the activation did something)


def test_reference_hardswish_is_f_hardswish():
    y = torch.cat([torch.randn(10000) * 4, torch.tensor([-3.0, 3.0, 0.0, -0.0, 1e-30, 6.0])])
    assert torch.equal(y * (y + 3.0).clamp(0.0, 6.0) / 6.0, torch.nn.functional.hardswish(y))


OFFSET_CASES = [c for c in CASES if c[0] in ("r20.stem", "stem.3ch", "r20.block1",
                                            "r20.shortcut2", "odd", "dilated", "grouped.8",
                                            "grouped.6", "depthwise", "depthwise.x2",
                                            "depthwise.144.s2", "depthwise.24.s1",
                                            "depthwise.64.s2.odd")]


@needs_cpu
@pytest.mark.parametrize("case", OFFSET_CASES, ids=[c[0] for c in OFFSET_CASES])
def test_w_offset_exact(case):
    """Asymmetric 8-bit weights: rows of 256 levels anywhere in [-255, 255], packed as int8
    minus a per-row offset that the kernel adds back as offset x window sum. Against the
    reference and, through the integer accumulator, a float64 conv with the full weights."""
    _, b, c, h, w, cout, k, s, p, d, g = case
    for x_dtype, out_dtype, cl in [(torch.int8, torch.float32, True),
                                   (torch.uint8, torch.int8, False)]:
        x, xz, _, ws, bias, kw = _args(case, x_dtype, out_dtype, None, cl, seed=3)
        gen = torch.Generator().manual_seed(4)
        lo = torch.randint(-255, 1, (cout, 1, 1, 1), generator=gen)
        full = lo + torch.randint(0, 256, (cout, c // g, k, k), generator=gen)
        full[0] = lo[0] + 255  # a row of one value, at the top of its range
        off = torch.where((full.amin((1, 2, 3)) >= -128) & (full.amax((1, 2, 3)) <= 127),
                          0, full.amin((1, 2, 3)) + 128).to(torch.int32)
        stored = (full - off.reshape(-1, 1, 1, 1)).to(torch.int8)
        assert bool(off.ne(0).any())
        ref = sk.quantized_conv2d_packed(x, 0.02, xz, R.conv2d_prepack(stored, g), ws, bias,
                                         w_offset=off, backend="reference", **kw)
        got = sk.quantized_conv2d_packed(x, 0.02, xz, sk.prepack_conv2d_weight(stored, g), ws,
                                         bias, w_offset=off, backend="cpu", **kw)
        assert torch.equal(got, ref), (x_dtype, out_dtype)
        if out_dtype == torch.float32:  # the accumulator itself, unit scales
            one = torch.ones(cout)
            acc = sk.quantized_conv2d_packed(x, 1.0, xz, sk.prepack_conv2d_weight(stored, g),
                                             one, w_offset=off, backend="cpu",
                                             stride=kw["stride"], padding=kw["padding"],
                                             dilation=kw["dilation"], groups=g)
            want = torch.nn.functional.conv2d(x.double() - xz, full.double(), None, kw["stride"],
                                              kw["padding"], kw["dilation"], g)
            assert torch.equal(acc.double(), want)


def _general_dw_layout(wq):
    """A depthwise weight in the general 64-byte layout (what prepack gave before the
    compact one, and what a caller may have built by the documented indexing)."""
    c, _, kh, kw = wq.shape
    wp = torch.zeros(c, 1, kh, kw, 1, 64, dtype=torch.int8)
    wp[..., 0] = wq.reshape(c, 1, kh, kw, 1)
    return wp


@needs_cpu
@pytest.mark.parametrize("case", [c for c in CASES if c[0].startswith("depthwise")
                                  and c[0] != "depthwise.x2"], ids=lambda c: c[0])
def test_depthwise_compact_layout(case):
    """Depthwise weights pack as one byte per channel and tap; the general 64-byte layout
    of the same weight still runs, with the same result, on both backends, with and
    without weight offsets; and unpacks to the same weight."""
    _, b, c, h, w, cout, k, s, p, d, g = case
    x, xz, wq, ws, bias, kw = _args(case, torch.int8, torch.int8, None, True)
    for be in ("reference", "cpu"):
        wp = sk.prepack_conv2d_weight(wq, g, backend=be)
        assert wp.shape == (c, 1, k, k, 1, 1) and torch.equal(wp.flatten(), wq.flatten())
    general = _general_dw_layout(wq)
    assert torch.equal(R.conv2d_unpack(general, cout, 1), R.conv2d_unpack(wp, cout, 1))
    off = torch.arange(c, dtype=torch.int32) % 7 - 3
    for be in ("reference", "cpu"):
        for o in (None, off):
            outs = [sk.quantized_conv2d_packed(x, 0.02, xz, packed, ws, bias, relu=True,
                                               w_offset=o, backend=be, **kw)
                    for packed in (wp, general)]
            assert torch.equal(outs[0], outs[1]), (be, o is None)


@needs_cpu
def test_compact_layout_only_for_depthwise():
    """A weight in the compact layout given to a conv that is not depthwise (here one with
    two input channels per group, whose general packed shape differs only in the last
    dim) is refused by the wrapper, the C++ op and the reference unpack."""
    wq = torch.randint(-128, 128, (8, 1, 3, 3), dtype=torch.int8)
    wp = sk.prepack_conv2d_weight(wq, 8)
    x = torch.randint(-128, 128, (1, 16, 6, 6), dtype=torch.int8)
    with pytest.raises(ValueError, match="does not fit x_q with C = 16, groups = 8"):
        sk.quantized_conv2d_packed(x, 0.1, 0, wp, torch.ones(8), groups=8)
    with pytest.raises(RuntimeError, match="compact depthwise layout"):
        torch.ops.synq._quantized_conv2d_packed(
            x, torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32), wp, torch.ones(8),
            None, [1, 1], [0, 0], [1, 1], 8, False, torch.float32, None, None, None, None,
            None, None, None)
    with pytest.raises(ValueError, match="compact depthwise layout"):
        R.conv2d_unpack(wp, 8, 2)


@needs_cpu
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_exact(out_dtype):
    ref, got = _run(CASES[1], torch.int8, out_dtype, "int8", True, relu=True)
    assert torch.equal(got, ref)


@needs_cpu
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_thread_splits(threads, batch):
    case = ("t", batch, 32, 14, 14, 48, 3, 1, 1, 1, 1)
    ref, got = _run(case, torch.int8, torch.int8, "int8", True, relu=True, threads=threads)
    assert torch.equal(got, ref)
    # depthwise, split within rows (the 3x3 row kernel walks partial rows)
    case = ("t.dw", batch, 48, 30, 41, 48, 3, 1, 1, 1, 48)  # work >= 2^18: split
    ref, got = _run(case, torch.int8, torch.int8, None, True, relu=True, threads=threads)
    assert torch.equal(got, ref)


@needs_cpu
def test_requantize_rounds_half_to_even_and_clamps():
    # 1x1 conv of a single channel with unit weights: y = x_scale * (x - x_zero) exactly.
    x = torch.arange(-128, 128, dtype=torch.int8).reshape(1, 1, 16, 16)
    wp = sk.prepack_conv2d_weight(torch.ones(1, 1, 1, 1, dtype=torch.int8))
    y = sk.quantized_conv2d_packed(x, 0.5, 0, wp, torch.ones(1), out_dtype=torch.int8,
                                   out_scale=1.0, out_zero=0)
    want = torch.round(x.float() * 0.5).to(torch.int8)
    assert torch.equal(y, want.contiguous(memory_format=torch.channels_last))
    y = sk.quantized_conv2d_packed(x, 4.0, 0, wp, torch.ones(1), out_dtype=torch.uint8,
                                   out_scale=1.0, out_zero=10)
    assert int(y.min()) == 0 and int(y.max()) == 255


@needs_cpu
@pytest.mark.parametrize("out_dtype, out_max", [(torch.int8, -113), (torch.int8, -128),
                                                (torch.uint8, 7), (torch.uint8, 255)])
def test_out_max_lowers_the_top(out_dtype, out_max):
    """out_max (a grid narrower than 8 bits) clamps inside the epilogue: exact against the
    reference, and the same as clamping the unclamped result afterwards."""
    by_name = {c[0]: c for c in CASES}  # general and depthwise kernels; 3x3 rows without
    for case, res in ((by_name["r20.block1"], "int8"),  # a residual (dw_rows.h)
                      (by_name["depthwise.24.s1"], None),
                      (by_name["depthwise.40.dilated"], "int8")):
        x, xz, wq, ws, bias, kw = _args(case, torch.int8, out_dtype, res, True)
        kw["out_scale"] = 0.05 if res else 0.005      # many values above the top
        outs = []
        for be in ("reference", "cpu"):
            wp = sk.prepack_conv2d_weight(wq, kw["groups"], backend=be)
            outs.append(sk.quantized_conv2d_packed(x, 0.02, xz, wp, ws, bias, relu=True,
                                                   out_max=out_max, backend=be, **kw))
            full = sk.quantized_conv2d_packed(x, 0.02, xz, wp, ws, bias, relu=True,
                                              backend=be, **kw)
            assert torch.equal(outs[-1], full.clamp(max=out_max))
        assert torch.equal(outs[0], outs[1])
        assert int(outs[1].max()) == out_max


@needs_cpu
def test_opcheck():
    x, xz, wq, ws, bias, kw = _args(CASES[5], torch.int8, torch.int8, "int8", True)
    wp = torch.ops.synq._conv2d_prepack(wq, 1)
    torch.library.opcheck(torch.ops.synq._conv2d_prepack.default, (wq, 1))
    args = (x, torch.tensor([0.02]), torch.tensor([xz], dtype=torch.int32), wp, ws, bias,
            kw["stride"], kw["padding"], kw["dilation"], 1, True, torch.int8,
            torch.tensor([0.37]), torch.tensor([-3], dtype=torch.int32), kw["residual"],
            torch.tensor([0.05]), torch.tensor([4], dtype=torch.int32))
    torch.library.opcheck(torch.ops.synq._quantized_conv2d_packed.default, args)
    torch.library.opcheck(torch.ops.synq._quantized_conv2d_packed.default, args + (-20,))
    wo = torch.arange(wq.shape[0], dtype=torch.int32) - 5  # weight offsets
    torch.library.opcheck(torch.ops.synq._quantized_conv2d_packed.default,
                          args + (None, wo))
    args = args[:11] + (torch.float32, None, None, None, None, None)
    torch.library.opcheck(torch.ops.synq._quantized_conv2d_packed.default, args)
    torch.library.opcheck(torch.ops.synq._quantized_conv2d_packed.default, args + (None, wo))


def test_errors():
    x = torch.randint(-128, 128, (1, 8, 6, 6), dtype=torch.int8)
    wp = sk.prepack_conv2d_weight(torch.randint(-128, 128, (4, 8, 3, 3), dtype=torch.int8))
    with pytest.raises(ValueError, match="does not fit x_q with C = 8, groups = 1 and Cout = 17"):
        sk.quantized_conv2d_packed(x, 0.1, 0, wp, torch.ones(17))
    with pytest.raises(ValueError, match="out_scale and out_zero are needed exactly"):
        sk.quantized_conv2d_packed(x, 0.1, 0, wp, torch.ones(4), out_dtype=torch.int8)
    with pytest.raises(ValueError, match="x_zero must be within x_q's range"):
        sk.quantized_conv2d_packed(x, 0.1, 200, wp, torch.ones(4))
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        sk.quantized_conv2d_packed(x, 0.1, 0, wp, torch.ones(4), padding=1,
                                   residual=torch.zeros(1, 4, 5, 5))
    with pytest.raises(ValueError, match="needs residual_scale and residual_zero"):
        sk.quantized_conv2d_packed(x, 0.1, 0, wp, torch.ones(4), padding=1,
                                   residual=torch.zeros(1, 4, 6, 6, dtype=torch.int8))
    with pytest.raises(ValueError, match="out_max applies to an int8 / uint8 output only"):
        sk.quantized_conv2d_packed(x, 0.1, 0, wp, torch.ones(4), out_max=3)
    with pytest.raises(ValueError, match="out_max must be from -128 to 127, got 200"):
        sk.quantized_conv2d_packed(x, 0.1, 0, wp, torch.ones(4), out_dtype=torch.int8,
                                   out_scale=0.1, out_zero=0, out_max=200)
    with pytest.raises(TypeError, match="w_packed must have dtype int8"):
        sk.quantized_conv2d_packed(x, 0.1, 0, wp.to(torch.int16), torch.ones(4))
    with pytest.raises(ValueError, match="relu and hardswish cannot both be set"):
        sk.quantized_conv2d_packed(x, 0.1, 0, wp, torch.ones(4), relu=True, hardswish=True)
    with pytest.raises(RuntimeError, match="relu and hardswish cannot both be set"):
        torch.ops.synq._quantized_conv2d_packed(
            x, torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32), wp, torch.ones(4),
            None, [1, 1], [0, 0], [1, 1], 1, True, torch.float32, None, None, None, None,
            None, None, None, True)
    with pytest.raises(ValueError, match=r"w_offset must be a \(4,\) integer tensor"):
        sk.quantized_conv2d_packed(x, 0.1, 0, wp, torch.ones(4), w_offset=torch.zeros(3))
    with pytest.raises(TypeError, match="w_offset must have dtype"):
        sk.quantized_conv2d_packed(x, 0.1, 0, wp, torch.ones(4), w_offset=torch.zeros(4))
    with pytest.raises(RuntimeError, match="w_offset must be a contiguous int32 tensor of 4"):
        torch.ops.synq._quantized_conv2d_packed(
            x, torch.tensor([0.1]), torch.tensor([0], dtype=torch.int32), wp, torch.ones(4),
            None, [1, 1], [0, 0], [1, 1], 1, False, torch.float32, None, None, None, None,
            None, None, torch.zeros(5, dtype=torch.int32))
    with pytest.raises(TypeError, match="conv2d_prepack takes int8 weights"):
        sk.reference.int_gemm.conv2d_prepack(torch.zeros(4, 4, 3, 3, dtype=torch.int16))


def test_torch_compile_fullgraph():
    wq = torch.randint(-128, 128, (16, 4, 3, 3), dtype=torch.int8)
    wp = sk.prepack_conv2d_weight(wq)
    ws = torch.rand(16) + 0.1

    def block(x):
        x_q = torch.clamp(torch.round(x / 0.05), -128, 127).to(torch.int8)
        y = sk.quantized_conv2d_packed(x_q, 0.05, 0, wp, ws, padding=1, relu=True,
                                       out_dtype=torch.int8, out_scale=0.1, out_zero=-128)
        return y.float().sum(1)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(compiled(x), block(x))


@needs_cpu
@pytest.mark.skipif(os.environ.get("SYNQ_CPU_NO_AVX512") == "1",
                    reason="already the AVX2 micro-kernel")
def test_avx2_micro_kernel_where_avx512_vnni_is_present(tmp_path):
    """On a CPU with AVX-512 VNNI the conv's micro-kernel is vpdpwssd; the AVX2 one
    (SYNQ_CPU_NO_AVX512=1, read once per process) must stay exact too: this file's exactness
    tests again in a process that keeps it (on an AVX2-only CPU both runs take AVX2)."""
    env = dict(os.environ, SYNQ_CPU_NO_AVX512="1")
    # its own basetemp, apart from the numbered run folders that pytest rotates in the shared one
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--basetemp={tmp_path / 'child'}",
                        __file__, "-k", "exact or requantize or out_max or thread_splits"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.parametrize("bad", [0.0, -0.5, float("inf"), float("nan")])
def test_bad_per_tensor_scales(bad):
    """One-element scales take a shorter check (one read, no reduction): still every bad
    value refused, as a number or a tensor, for x_scale, w_scale (one output channel) and
    out_scale."""
    x = torch.randint(-128, 128, (1, 4, 5, 5), dtype=torch.int8)
    wp = sk.prepack_conv2d_weight(torch.randint(-128, 128, (1, 4, 3, 3), dtype=torch.int8))
    good = dict(x_scale=0.1, w_scale=torch.ones(1), out_scale=0.5)
    for name in good:
        for as_tensor in (False, True):
            kw = dict(good)
            number = not as_tensor and name != "w_scale"
            kw[name] = bad if number else torch.tensor([bad])
            if number and not math.isfinite(bad):  # refused before it becomes a tensor
                match = f"{name} must be a finite number"
            else:
                match = f"{name} must be positive and finite"
            with pytest.raises(ValueError, match=match):
                sk.quantized_conv2d_packed(x, kw["x_scale"], 0, wp, kw["w_scale"],
                                           out_dtype=torch.int8, out_scale=kw["out_scale"],
                                           out_zero=0)


@needs_cpu
def test_w_offset_beyond_int16_refused_and_prepack_copies():
    """The cpu kernels fold weight offsets into int16 weights (depthwise, AVX2): an offset
    that would wrap there is refused with its channel named, at the limit it is exact. And
    the reference prepack of a depthwise weight is a copy, as the cpu one is (a view would
    follow later writes to the weight)."""
    case = next(c for c in CASES if c[0] == "depthwise.24.s1")
    x, xz, wq, ws, bias, kw = _args(case, torch.int8, torch.int8, None, True)
    wp = sk.prepack_conv2d_weight(wq, 24)
    off = torch.zeros(24, dtype=torch.int32)
    off[5] = 32640
    with pytest.raises(RuntimeError, match="w_offset must be within \\+-32639, got 32640 for "
                                           "output channel 5"):
        sk.quantized_conv2d_packed(x, 0.02, xz, wp, ws, bias, w_offset=off, backend="cpu",
                                   **kw)
    off[5] = -32639
    got, want = (sk.quantized_conv2d_packed(x, 0.02, xz, wp, ws, bias, w_offset=off,
                                            backend=be, **kw) for be in ("cpu", "reference"))
    assert torch.equal(got, want)
    for be in ("cpu", "reference"):
        w = wq.clone()
        packed = sk.prepack_conv2d_weight(w, 24, backend=be)
        w.fill_(0)
        assert torch.equal(packed.flatten(), wq.flatten()), be

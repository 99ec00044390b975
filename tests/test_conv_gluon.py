"""synq_kernels.triton.conv_gluon: the opt-in (SYNQ_GLUON_CONV=1) Gluon int8 conv with TMA
operands and asynchronous wgmma for sm_90. Without a GPU: compiled ahead of time for
ResNet-18's stride-1 layers and its PTX checked, and its tiling, TMA coordinates and
zero-point correction replayed in PyTorch against the reference. On a GPU: exact against
the reference."""
import itertools

import pytest
import torch

import synq_kernels as sk
from synq_kernels.reference import int_gemm as R

from isolated import in_child
from test_int_gemm import rand_i8

G = pytest.importorskip("synq_kernels.triton.conv_gluon")

_AOT_SCRIPT = r'''
import os, subprocess, tempfile
from triton.experimental.gluon._runtime import GluonASTSource
from synq_kernels.triton import conv_gluon as G

tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# ResNet-18's stride-1 layers at batch 256 (the four tile shapes) and a 1x1 conv
for nb, h, w, c, cout, k in [(256, 56, 56, 64, 64, 3), (256, 28, 28, 128, 128, 3),
                             (256, 14, 14, 256, 256, 3), (256, 7, 7, 512, 512, 3),
                             (256, 14, 14, 256, 512, 1)]:
    tb, th, tw = G.tile_shape(nb, h, w)
    lx, lw = G.layouts(tb, th, tw)
    sig = {"x_desc": f"tensordesc<i8[{tb}, {th}, {tw}, {G.BK}],{lx!r}>",
           "w_desc": f"tensordesc<i8[{G.BN}, {G.BK}],{lw!r}>",
           "out_ptr": "*fp32", "xs_ptr": "*fp32", "xz_ptr": "*i32", "ws_ptr": "*fp32",
           "rs_ptr": "*i32", "bs_ptr": "*i32", "bias_ptr": "*fp32", "NB": "i32", "H": "i32",
           "W": "i32", "COUT": "i32"}
    consts = dict(C=c, KS=k, TB=tb, TH=th, TW=tw, HAS_BIAS=True, RELU=True, STAGES=4,
                  num_warps=4)
    sig.update({name: "constexpr" for name in consts})
    kern = triton.compile(GluonASTSource(fn=G._conv_s8_kernel, signature=sig, constexprs=consts),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = kern.asm["ptx"]
    what = (h, w, c, k)
    mma = re.findall(r"wgmma\.mma_async\S*", ptx)
    # a K block of 64: two k32 steps for each of the tile's two 64-row halves
    assert len(mma) == 4 and all(x.endswith("m64n64k32.s32.s8.s8") for x in mma), (what, mma)
    assert "wgmma.wait_group.sync.aligned 1;" in ptx, what  # one wgmma kept in flight
    # the input box by one 4-D TMA copy, the weight tile by a 2-D one; no register loads
    # of operands (the epilogue's per-channel vectors are the only global loads)
    assert "cp.async.bulk.tensor.4d" in ptx and "cp.async.bulk.tensor.2d" in ptx, what
    after = ptx.split("wgmma.wait_group.sync.aligned 1;")[1]
    assert after.index("bar.sync") < after.index("cp.async.bulk.tensor"), what
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kern.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    regs, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    assert stack == 0 and regs <= 168, (what, regs, stack)  # no spills; 3 programs an SM
    assert kern.metadata.shared <= 64 * 1024, (what, kern.metadata.shared)
print("ok")
'''


def test_gluon_conv_compiles_for_sm90_without_gpu():
    pytest.importorskip("triton.experimental.gluon")
    import triton_aot
    triton_aot.run(_AOT_SCRIPT)


def _box(xn, b0, y0, x0, c0, tb, th, tw, bk):
    """TMA's tiled copy: the box at (b0, y0, x0, c0) of the NHWC tensor, zeros outside."""
    nb, h, w, c = xn.shape
    out = torch.zeros(tb, th, tw, bk, dtype=xn.dtype)
    for i, j, k in itertools.product(range(tb), range(th), range(tw)):
        b, y, x = b0 + i, y0 + j, x0 + k
        if 0 <= b < nb and 0 <= y < h and 0 <= x < w:
            out[i, j, k] = xn[b, y, x, c0:c0 + bk]
    return out


def _replay(x, xz, w):
    """conv_gluon's integer result (before its float epilogue) computed the kernel's way:
    programs over (TB, TH, TW) pixel tiles, K blocks of (tap, channel block) with the input
    box at the tap's offset, then the zero-point correction of padded taps."""
    nb, c, h, wd = x.shape
    cout, _, k, _ = w.shape
    pad = k // 2
    tb, th, tw = G.tile_shape(nb, h, wd)
    assert tb * th * tw == G.BM
    xn = x.permute(0, 2, 3, 1).long()
    wr = w.permute(0, 2, 3, 1).reshape(cout, k * k * c).long()
    rowsum, table = w.long().sum((1, 2, 3)), G.border_sums(w).long()
    out = torch.full((nb, h, wd, cout), -(2 ** 40), dtype=torch.long)
    written = torch.zeros(nb, h, wd, dtype=torch.long)
    rows = torch.arange(G.BM)
    for b0, y0, x0 in itertools.product(range(0, nb, tb), range(0, h, th), range(0, wd, tw)):
        acc = torch.zeros(G.BM, cout, dtype=torch.long)
        for tap, c0 in itertools.product(range(k * k), range(0, c, G.BK)):
            a = _box(xn, b0, y0 + tap // k - pad, x0 + tap % k - pad, c0, tb, th, tw, G.BK)
            acc += a.reshape(G.BM, G.BK) @ wr[:, tap * c + c0:tap * c + c0 + G.BK].T
        b, y, xx = b0 + rows // (th * tw), y0 + (rows // tw) % th, x0 + rows % tw
        acc -= xz * rowsum[None, :]
        if pad:
            over = [(pad - y).clamp(0, pad), (y + pad - (h - 1)).clamp(0, pad),
                    (pad - xx).clamp(0, pad), (xx + pad - (wd - 1)).clamp(0, pad)]
            pat = ((over[0] * (pad + 1) + over[1]) * (pad + 1) + over[2]) * (pad + 1) + over[3]
            acc += xz * table[pat]
        ok = (b < nb) & (y < h) & (xx < wd)
        out[b[ok], y[ok], xx[ok]] = acc[ok]
        written[b[ok], y[ok], xx[ok]] += 1
    assert torch.equal(written, torch.ones_like(written))  # every pixel once
    return out


@pytest.mark.parametrize("nb, h, w, c, cout, k", [
    (3, 9, 10, 64, 64, 3),     # one tile row per image, ragged in both directions
    (2, 7, 7, 128, 64, 3),     # two images per tile (ResNet-18's layer4 shape)
    (1, 5, 13, 64, 128, 1),    # 1x1: no padding, no correction
    (1, 4, 3, 64, 64, 5)])     # a 5x5 kernel larger than the image: every tap padded somewhere
def test_tiling_and_zero_point_correction_replayed(nb, h, w, c, cout, k):
    torch.manual_seed(nb * 100 + h)
    x, wq = rand_i8(nb, c, h, w), rand_i8(cout, c, k, k)
    xz = torch.randint(-128, 128, ()).item()
    want = R.quantized_conv2d_int(x, xz, wq, padding=(k // 2, k // 2))
    got = _replay(x, xz, wq).permute(0, 3, 1, 2)
    assert torch.equal(got, want.long()), (nb, h, w, c, cout, k)


def test_border_sums_by_brute_force():
    torch.manual_seed(4)
    for k in (1, 3, 5):
        w = rand_i8(8, 3, k, k)
        table, p = G.border_sums(w), k // 2
        for i in range((p + 1) ** 4):
            ot, ob, ol, orr = (i // (p + 1) ** 3, i // (p + 1) ** 2 % (p + 1),
                               i // (p + 1) % (p + 1), i % (p + 1))
            keep = torch.ones(k, k, dtype=torch.bool)
            keep[:ot], keep[k - ob:], keep[:, :ol], keep[:, k - orr:] = False, False, False, False
            want = (w.long() * (~keep)).sum((1, 2, 3))
            assert torch.equal(table[i].long(), want), (k, ot, ob, ol, orr)


def test_weight_operands_are_kept_until_the_weight_changes():
    w = rand_i8(64, 64, 3, 3)
    wr, table = G._weight_operands(w)
    assert torch.equal(wr, w.permute(0, 2, 3, 1).reshape(64, -1))
    assert torch.equal(table, G.border_sums(w))
    assert G._weight_operands(w)[0] is wr  # not reordered again
    w.add_(1)
    wr2, table2 = G._weight_operands(w)
    assert wr2 is not wr and torch.equal(wr2, w.permute(0, 2, 3, 1).reshape(64, -1))
    assert torch.equal(table2, G.border_sums(w))


def test_tile_shapes_cover_resnet_layers():
    for nb, h, w in [(256, 56, 56), (256, 28, 28), (256, 14, 14), (256, 7, 7), (1, 1, 1),
                     (3, 112, 112), (2, 3, 200)]:
        tb, th, tw = G.tile_shape(nb, h, w)
        assert tb * th * tw == G.BM and tw & (tw - 1) == 0 and th & (th - 1) == 0
        assert tw <= 64 and (tw >= w or tw == 64) and (tb == 1 or th * 2 > h)


def _sm90_gluon():
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
            and G.gluon is not None and "triton" in sk.available_backends("quantized_conv2d",
                                                                          "cuda"))


@pytest.mark.skipif(not _sm90_gluon(), reason="needs an sm_90 GPU, triton with Gluon")
def test_cuda_gluon_conv_exact(monkeypatch, request):
    """On the GPU: unit scales and no bias make the float32 output the corrected integer sum
    (exact below 2^24); then scales, bias and ReLU against the cpu backend's float32
    epilogue (to float32 rounding: the GPU compiler may fuse the multiply and the bias add).
    Ragged images, tiles of 8, 16 and 64 columns (two 7x7 images in one), 1x1 and 3x3."""
    if not in_child(request):  # never run on a GPU yet: a fault must fail this test alone
        return
    monkeypatch.setenv("SYNQ_GLUON_CONV", "1")
    calls = []
    real = G.conv2d
    monkeypatch.setattr(G, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    # few constexpr combinations (each one a compile, inside gpu_check's 70 s test step)
    cases = [(3, 9, 10, 64, 64, 3), (2, 7, 7, 128, 64, 3), (1, 56, 56, 64, 128, 3),
             (2, 13, 5, 192, 64, 1)]
    for i, (nb, h, w, c, cout, k) in enumerate(cases):
        x = rand_i8(nb, c, h, w, lo=-20, hi=20).contiguous(memory_format=torch.channels_last)
        wq = rand_i8(cout, c, k, k, lo=-20, hi=20)
        xz = torch.tensor([7], dtype=torch.int32)
        args = dict(stride=1, padding=k // 2, w_rowsum=sk.weight_row_sums(wq))
        got = sk.quantized_conv2d(x.cuda(), 1.0, xz.cuda(), wq.cuda(), torch.ones(cout).cuda(),
                                  backend="triton", **args)
        want = sk.quantized_conv2d(x, 1.0, xz, wq, torch.ones(cout), backend="reference",
                                   **args)
        assert torch.equal(got.cpu(), want), ("exact", nb, h, w, c, cout, k)
        if i % 2:
            continue
        ws, bias = torch.rand(cout) * 0.01 + 0.001, torch.randn(cout)
        got = sk.quantized_conv2d(x.cuda(), 0.05, xz.cuda(), wq.cuda(), ws.cuda(), bias.cuda(),
                                  relu=True, backend="triton", **args)
        want = sk.quantized_conv2d(x, 0.05, xz, wq, ws, bias, relu=True, backend="cpu", **args)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-5,
                                   msg=lambda m: f"epilogue {(nb, h, w, c, cout, k)}: {m}")
    assert len(calls) == len(cases) + (len(cases) + 1) // 2

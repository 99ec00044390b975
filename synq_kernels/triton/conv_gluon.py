"""int8 convolution for Hopper (sm_90) in Gluon, with asynchronous wgmma: the triton backend's
quantized_conv2d with `SYNQ_GLUON_CONV=1` (opt-in: compiled for sm_90 ahead of time here, not
yet run on a GPU) for stride-1 "same" convolutions (odd square kernels, padding k // 2), one
group, channels-last int8 input with C a multiple of 64 and Cout of 64, float output.

Why: conv_tap.py's implicit GEMM reaches about 0.2x cuDNN fp16 on ResNet-18's layers, and
Triton keeps its int8 dots synchronous (see int_gemm_gluon.py). Here both operands come by
TMA and one wgmma stays in flight:

- A program owns TB x TH x TW output pixels (128 rows: TB images, TH rows, TW columns) and
  BN output channels. For tap (r, s) and channel block c, its A tile is the input box at
  (b0, y0 + r - p, x0 + s - p, c): one 4-D TMA copy, no address arithmetic per row. Rows
  that fall outside the image arrive as zeros from TMA's out-of-bounds fill.
- The weight, reordered to (Cout, kh * kw * C), gives B tiles by 2-D TMA.
- The padding should hold the input's zero point, not 0: the accumulator misses
  x_zero * (the padded taps' weight sums) on border pixels, which the epilogue adds back
  from a table of those sums per border pattern (`border_sums`; exact, in int32):
  sum over taps of (x - x_zero) w = acc - x_zero * (rowsum[n] - padded taps' sums[n]).
- Epilogue: out = float32(that) * (x_scale * w_scale[n]) + bias[n], ReLU, as the other
  backends compute it; stores masked to the image.
"""
from __future__ import annotations

import os
import weakref

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # a Triton without Gluon (before 3.4)
    gluon = None

BM, BN, BK = 128, 64, 64


def enabled() -> bool:
    return os.environ.get("SYNQ_GLUON_CONV", "0") == "1" and gluon is not None


def tile_shape(b: int, h: int, w: int) -> tuple[int, int, int]:
    """(TB, TH, TW) with TB * TH * TW = BM: TW the power of two covering the width (at most
    64), TH rows, and whole images when an image has fewer than BM pixels' worth of rows."""
    tw = 8
    while tw < min(w, 64):
        tw *= 2
    th = 8 if tw == 8 else BM // tw
    while th > 1 and th // 2 >= h:
        th //= 2
    return BM // (th * tw), th, tw


def usable(x, w, stride, padding, dilation, groups, w_offset, packed) -> bool:
    """Whether the kernel takes this call: sm_90, int8 channels-last input, int8 weight
    without offsets, a stride-1 dilation-1 single-group conv of an odd square kernel with
    padding k // 2, channels in whole blocks, TMA's 16-byte alignment."""
    if gluon is None or not x.is_cuda or torch.cuda.get_device_capability(x.device) != (9, 0):
        return False
    cout, cg, kh, kw = w.shape
    return (x.dtype == torch.int8 and w.dtype == torch.int8 and not packed
            and w_offset is None and groups == 1 and kh == kw and kh % 2 == 1
            and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and tuple(padding) == (kh // 2, kh // 2) and cg % BK == 0 and cout % BN == 0
            and x.is_contiguous(memory_format=torch.channels_last)
            and x.data_ptr() % 16 == 0)


if gluon is not None:
    @gluon.jit
    def _conv_s8_kernel(x_desc, w_desc, out_ptr, xs_ptr, xz_ptr, ws_ptr, rs_ptr, bs_ptr,
                        bias_ptr, NB, H, W, COUT,
                        C: gl.constexpr, KS: gl.constexpr, TB: gl.constexpr, TH: gl.constexpr,
                        TW: gl.constexpr, HAS_BIAS: gl.constexpr, RELU: gl.constexpr,
                        STAGES: gl.constexpr, num_warps: gl.constexpr):
        BM_: gl.constexpr = TB * TH * TW
        BK_: gl.constexpr = x_desc.block_type.shape[3]
        BN_: gl.constexpr = w_desc.block_type.shape[0]
        PAD: gl.constexpr = KS // 2
        CB: gl.constexpr = C // BK_
        N_K: gl.constexpr = KS * KS * CB
        NBYTES: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes

        pid = gl.program_id(0)
        n_n = COUT // BN_
        tiles_x = gl.cdiv(W, TW)
        tiles_y = gl.cdiv(H, TH)
        pid_m = pid // n_n
        off_n = (pid % n_n) * BN_
        b0 = (pid_m // (tiles_x * tiles_y)) * TB
        y0 = ((pid_m // tiles_x) % tiles_y) * TH
        x0 = (pid_m % tiles_x) * TW

        a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, TB, TH, TW, BK_], x_desc.layout)
        b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN_, BK_], w_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)

        mma: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN_, 32])
        acc = gl.zeros((BM_, BN_), dtype=gl.int32, layout=mma)

        for i in gl.static_range(STAGES - 1):  # the first blocks' copies
            ok = i < N_K
            tap = i // CB
            mbarrier.expect(bars.index(i), NBYTES, pred=ok)
            tma.async_copy_global_to_shared(
                x_desc, [b0, y0 + tap // KS - PAD, x0 + tap % KS - PAD, (i % CB) * BK_],
                bars.index(i), a_bufs.index(i), pred=ok)
            tma.async_copy_global_to_shared(w_desc, [off_n, tap * C + (i % CB) * BK_],
                                            bars.index(i), b_bufs.index(i), pred=ok)
        for kb in range(N_K):
            cur = kb % STAGES
            mbarrier.wait(bars.index(cur), (kb // STAGES) & 1)
            a = a_bufs.index(cur).reshape([BM_, BK_])
            acc = warpgroup_mma(a, b_bufs.index(cur).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            nxt = kb + STAGES - 1
            ok = nxt < N_K
            t = nxt % STAGES
            tap = nxt // CB
            cb = nxt % CB
            mbarrier.expect(bars.index(t), NBYTES, pred=ok)
            tma.async_copy_global_to_shared(
                x_desc, [b0, y0 + tap // KS - PAD, x0 + tap % KS - PAD, cb * BK_],
                bars.index(t), a_bufs.index(t), pred=ok)
            tma.async_copy_global_to_shared(w_desc, [off_n, tap * C + cb * BK_],
                                            bars.index(t), b_bufs.index(t), pred=ok)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        # epilogue: rows are (image, row, column) of the tile, TW and TH powers of two
        rows = gl.arange(0, BM_, layout=gl.SliceLayout(1, mma))
        cols = off_n + gl.arange(0, BN_, layout=gl.SliceLayout(0, mma))
        b = b0 + rows // (TH * TW)
        y = y0 + (rows // TW) % TH
        x = x0 + rows % TW
        xz = gl.load(xz_ptr)
        acc = acc - gl.expand_dims(xz * gl.load(rs_ptr + cols), 0)
        if KS > 1:
            # the padded taps' weight sums back (int32, wrapping: exact), from the table of
            # border patterns: how many kernel rows / columns hang over each edge
            over_t = gl.minimum(gl.maximum(PAD - y, 0), PAD)
            over_b = gl.minimum(gl.maximum(y + PAD - (H - 1), 0), PAD)
            over_l = gl.minimum(gl.maximum(PAD - x, 0), PAD)
            over_r = gl.minimum(gl.maximum(x + PAD - (W - 1), 0), PAD)
            pat = ((over_t * (PAD + 1) + over_b) * (PAD + 1) + over_l) * (PAD + 1) + over_r
            back = gl.load(bs_ptr + gl.expand_dims(pat * COUT, 1) + gl.expand_dims(cols, 0))
            acc = acc + xz * back
        vals = acc.to(gl.float32)
        scale = gl.load(xs_ptr) * gl.load(ws_ptr + cols)
        out = vals * gl.expand_dims(scale, 0)
        if HAS_BIAS:
            out = out + gl.expand_dims(gl.load(bias_ptr + cols), 0)
        if RELU:
            out = gl.maximum(out, 0.0)
        pix = ((b.to(gl.int64) * H + y) * W + x) * COUT
        ok_rows = (b < NB) & (y < H) & (x < W)
        ptrs = out_ptr + gl.expand_dims(pix, 1) + gl.expand_dims(cols, 0)
        gl.store(ptrs, out, mask=gl.expand_dims(ok_rows, 1) & gl.expand_dims(cols < COUT, 0))


def layouts(tb: int, th: int, tw: int):
    """The shared-memory layouts of the input box (4-D) and the weight tile."""
    return (gl.NVMMASharedLayout.get_default_for([tb, th, tw, BK], gl.int8),
            gl.NVMMASharedLayout.get_default_for([BN, BK], gl.int8))


def border_sums(w: torch.Tensor) -> torch.Tensor:
    """((p + 1)^4, Cout) int32 for a k x k weight, p = k // 2: for each border pattern
    (kernel rows over the top edge, over the bottom one, columns over the left, over the
    right; each 0..p, in that order of significance), the weight sums of the taps it puts
    outside the image."""
    cout, c, k, _ = w.shape
    p = k // 2
    taps = w.to(torch.int64).sum(1).reshape(cout, k * k)  # each tap's sum over channels
    r = torch.arange(k).repeat_interleave(k)
    s = torch.arange(k).repeat(k)
    o = torch.arange(p + 1)
    ot, ob, ol, orr = (v.reshape(-1) for v in torch.meshgrid(o, o, o, o, indexing="ij"))
    out = ((r[None] < ot[:, None]) | (r[None] >= k - ob[:, None]) | (s[None] < ol[:, None])
           | (s[None] >= k - orr[:, None]))
    return (out.to(torch.int64) @ taps.t()).to(torch.int32).contiguous()


_WEIGHTS: dict = {}  # id(w) -> (weakref to w, its version, (reordered w, border sums))


def _weight_operands(w: torch.Tensor):
    """(w as (Cout, kh * kw * C) contiguous, border_sums(w)), kept while w is the same
    tensor at the same version, so that a call does not reorder its weight again (a copy
    and a small reduction on every call, which timed the kernel with them)."""
    got = _WEIGHTS.get(id(w))
    ver = None if w.is_inference() else w._version
    if got is not None and got[0]() is w and ver is not None and got[1] == ver:
        return got[2]
    cout, c, k, _ = w.shape
    ops = (w.permute(0, 2, 3, 1).reshape(cout, k * k * c).contiguous(), border_sums(w))
    if ver is not None:
        for key in [key for key, v in _WEIGHTS.items() if v[0]() is None]:
            del _WEIGHTS[key]  # weights freed since
        _WEIGHTS[id(w)] = (weakref.ref(w), ver, ops)
    return ops


def conv2d(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, relu, stages: int = 4):
    """Float32 channels-last (B, Cout, H, W) output of the int8 conv; `usable` must hold.
    x_scale, x_zero: one element each (x_zero in the int8 domain); w_scale, w_rowsum (Cout,)."""
    nb, c, h, wd = x.shape
    cout, _, k, _ = w.shape
    tb, th, tw = tile_shape(nb, h, wd)
    lx, lw = layouts(tb, th, tw)
    xv = x.permute(0, 2, 3, 1)  # the NHWC view (contiguous for a channels-last x)
    wr, bsums = _weight_operands(w)
    x_desc = TensorDescriptor(xv, [nb, h, wd, c], [h * wd * c, wd * c, c, 1], [tb, th, tw, BK], lx)
    w_desc = TensorDescriptor(wr, [cout, k * k * c], [k * k * c, 1], [BN, BK], lw)
    out = torch.empty(nb, cout, h, wd, device=x.device, dtype=torch.float32,
                      memory_format=torch.channels_last)
    grid = (-(-nb // tb) * -(-h // th) * -(-wd // tw) * (cout // BN),)
    _conv_s8_kernel[grid](
        x_desc, w_desc, out, x_scale.reshape(1).float(), x_zero.reshape(1).to(torch.int32),
        w_scale.float().contiguous(), w_rowsum.to(torch.int32).contiguous(), bsums,
        bias.float().contiguous() if bias is not None else w_scale, nb, h, wd, cout,
        C=c, KS=k, TB=tb, TH=th, TW=tw, HAS_BIAS=bias is not None, RELU=bool(relu),
        STAGES=stages, num_warps=4)
    return out

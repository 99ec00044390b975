"""The int8 implicit-GEMM convolution in Triton, with an optional requantizing epilogue: the
triton quantized_conv2d for int8 weights and more than one input channel per group, and the
fused conv of an exported model on a GPU (synq.deploy).

Three modes of one kernel. With at least TAP_MIN_CHANNELS channels per group, tap-blocked
(below). With fewer (a 3-channel stem, 16-channel ResNet-20 stages), K runs over (ky, kx, c),
the channel count and kernel width compile-time constants, so that splitting an index is a
multiply, not a division (the first kernel's three run-time divisions per element made
ResNet-18's stem take 6.8 ms at batch 256 on an H200):
- window-row mode, where one row of the window (kw * C / groups values) fits a block of
  at most 64 (RUN_K_RANGE): block ky holds window row ky, so each column's tap, channel
  offset and mask of x's width are fixed for the whole loop, and only the row changes
  (sm_90 SASS: 92 instructions a block for a 16-channel 3x3 conv with 16-byte copies of
  both operands, against 341 and byte loads flattened; ResNet-18's stem 347 against 521,
  at 120 registers against 166);
- flattened K otherwise: blocks cross taps, each A element gets its own window position
  and padding mask.

Tap-blocked: one program owns BM output pixels x BN output channels of one group and walks K
in one flat loop over blocks (window tap, channel block), advanced by counters, so a block
never straddles two taps. Its A tile is BM pixels x BK channels of one tap: row offsets and
channel offsets only, a contiguous run of bytes per pixel on a channels-last input; one loop
(not taps x channel blocks) keeps Triton's software pipelining over all of K. Window positions
in the padding read the zero point, which the row-sum correction cancels (zero padding in the
real domain): their pointers are switched to a page of zero-point bytes, so that no select
touches the tile's values and it goes from cp.async to the MMA in shared memory (a value
select, in the first version, sent it through registers and back: sm_90 TTGIR, Triton 3.8).
Channels past C / groups are masked to 0 in both operands. When BK divides C / groups (every
ResNet conv with >= 32 channels, not MobileNetV2's 96 / 144) no copy has a mask (EVEN_K):
rows past the last pixel read the zero-point page too, and weight rows past the group's
last output channel re-read that channel. With the window checks as unsigned compares
(0 <= i < n in one), this took the main loop from 137 to 111 SASS instructions a K block
for ResNet-18's 3x3 convs of 128-512 channels and from 172 to 144 for 64 (sm_90, Triton
3.6).

On sm_90, Triton issues each int8 wgmma and waits for it before the next K block: its WGMMA
pipeliner makes a dot asynchronous only with a float32 accumulator (triton-lang/triton,
lib/Dialect/TritonGPU/Transforms/Pipeliner/WGMMAPipeline.cpp, "Rule 2.1"), so overlap comes
from the other warps and programs on the SM, not from within a warp group.

Epilogue, in this order (the order of synq.deploy's unfused GPU path, up to float rounding):

    acc' = acc - x_zero * w_rowsum[n]  (+ offset[n] * sum over the window of (x - x_zero))
    y = float32(acc') * (x_scale * w_scale[n]) + bias[n]
    y += residual                      (float32, or res_scale * (r - res_zero) for int8 r)
    y = ReLU(y)
    out = y as float32 / float16 / bfloat16, or int8:
          clamp(round_half_even(y / out_scale) + out_zero, -128, out_hi)

The offset term is the one of exported asymmetric weights (synq.deploy: a row stored minus
an offset o[n]): sum_k (x_k - x_zero)(w_k + o) = acc + o * sum_k (x_k - x_zero). The window
sums come from per-pixel channel sums (one PyTorch reduction over x before the call), read
once per tap in the epilogue, so the main loop never reduces the A tile. y / out_scale is
the IEEE quotient, as torch.div: on a GPU a reciprocal and two fused multiply-adds
(Markstein's correction step, below), under the interpreter tl.math.div_rn; rounding is
half to even, as torch.round. With few K blocks the epilogue's per-value work is most of a
tile's: with div_rn (about ten instructions a value and a slow-path branch) and
compare-and-select rounding and clamping it was 3119 SASS instructions a thread in
ResNet-18's layer1 conv, whose 9 K blocks take 166 each; now 1786 (sm_90, Triton 3.6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import synq_kernels.triton as _st

from ..reference.int_gemm import conv_memory_format

# Channels per group from which the kernel runs tap-blocked; below it a K block of one tap
# would be mostly padding, and the flattened-K mode packs K densely instead.
TAP_MIN_CHANNELS = 32
# Output pixels (rows, counting the last tile's padding) up to which the kernel splits a row
# index into (batch, y, x) with float reciprocals (exact below 2^22: checked for every divisor
# up to 300000 at both sides of each multiple).
FAST_DIV_ROWS = 1 << 22
# kw * C / groups (one window row's K) for which a conv with fewer than TAP_MIN_CHANNELS
# channels per group runs the window-row mode rather than the flattened-K one (see above)
RUN_K_RANGE = (16, 64)


@triton.jit
def _conv_tap_kernel(x_ptr, w_ptr, out_ptr, xs_ptr, xz_ptr, zp_ptr, ws_ptr, rs_ptr, bias_ptr,
                     off_ptr, cs_ptr, res_ptr, rsc_ptr, rzp_ptr, osc_ptr, ozp_ptr, out_hi,
                     P, OHW, OW, inv_ohw, inv_ow, H, W, Cg, Og, KW, K, TAPS, n_kb,
                     n_tiles, sxb, sxc, sxh, sxw, swn, swc, swy, swx, sob, soc, soh, sow,
                     srb, src, srh, srw, scb, scg, sch, scw, sh, sw, ph, pw, dh, dw,
                     HAS_BIAS: tl.constexpr, HAS_OFFSET: tl.constexpr, RES_MODE: tl.constexpr,
                     RELU: tl.constexpr, OUT_Q: tl.constexpr, ROUND_BF16: tl.constexpr,
                     FLAT: tl.constexpr, RUN: tl.constexpr, CG: tl.constexpr,
                     KWC: tl.constexpr, W_PACKED: tl.constexpr, FAST_DIV: tl.constexpr,
                     HW_FMA: tl.constexpr, EVEN_K: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = pid_n // n_tiles
    rp = pid_m * BM + tl.arange(0, BM)
    p_ok = rp < P
    if FAST_DIV:
        # rows < 2^22: floor(n / d) is int(float32(n + 0.5) * float32(1 / d)) exactly (the
        # product's relative error, under 2^-23, stays below the 0.5 / d the quotient is
        # from an integer), a multiply where an integer division costs dozens of
        # instructions, repeated for every row in every register layout of the tile
        bi = ((rp.to(tl.float32) + 0.5) * inv_ohw).to(tl.int32)
        rem = rp - bi * OHW
        oy = ((rem.to(tl.float32) + 0.5) * inv_ow).to(tl.int32)
        ox = rem - oy * OW
    else:
        bi = rp // OHW
        oy = (rp % OHW) // OW
        ox = rp % OW
    iy0 = oy * sh - ph
    ix0 = ox * sw - pw
    xrow = bi * sxb + (g * Cg) * sxc
    rj = (pid_n % n_tiles) * BN + tl.arange(0, BN)
    j_ok = rj < Og
    rn = g * Og + rj
    rnb = g * Og + tl.minimum(rj, Og - 1)  # weight rows, past Og the last (EVEN_K loads)
    rc0 = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    # tap-blocked: the block's tap (ty, tx) and first channel tc advance as counters; from kb
    # by division (kb // n_cb, t // KW with run-time divisors) they took about 44 of the main
    # loop's 184 instructions (sm_90 SASS, a 3x3 conv of 256 channels)
    tc = tl.full([], 0, tl.int32)
    tx = tl.full([], 0, tl.int32)
    ty = tl.full([], 0, tl.int32)
    if RUN:
        # window-row mode: block kb is window row ky = kb, its column j the tap kx = j // CG,
        # channel j % CG; the column offsets and the masks of x's width do not depend on kb
        jx = rc0 // CG
        jv = rc0 < KWC * CG
        joff = jx * (dw * sxw) + (rc0 % CG) * sxc
        ixj = ix0[:, None] + (jx * dw)[None, :]
        xin = (ixj >= 0) & (ixj < W) & jv[None, :]
    for kb in range(0, n_kb):
        if RUN:
            iy = iy0 + kb * dh
            inside = xin & (iy.to(tl.uint32, bitcast=True) < H.to(tl.uint32))[:, None]
            a = tl.load(tl.where(inside, x_ptr + (xrow + iy * sxh + ix0 * sxw)[:, None]
                                 + joff[None, :], zp_ptr + rc0[None, :]),
                        mask=p_ok[:, None] & jv[None, :], other=0)
            # w: (Cout, KH * BK) bytes, window row ky at ky * BK, zero past KWC * CG
            b = tl.load(w_ptr + rn[:, None] * swn + (kb * BK + rc0)[None, :],
                        mask=j_ok[:, None], other=0)
        elif FLAT:
            # K flattened in (ky, kx, c) order, blocks across taps; CG and KWC are
            # compile-time constants, so the index split costs multiplies, not divisions
            rk = kb * BK + rc0
            k_ok = rk < K
            c = rk % CG
            tap = rk // CG
            ky = tap // KWC
            kx = tap % KWC
            iy = iy0[:, None] + (ky * dh)[None, :]
            ix = ix0[:, None] + (kx * dw)[None, :]
            # 0 <= i < n as one unsigned compare (a negative i wraps above n)
            inside = ((iy.to(tl.uint32, bitcast=True) < H.to(tl.uint32))
                      & (ix.to(tl.uint32, bitcast=True) < W.to(tl.uint32)))
            a = tl.load(tl.where(inside, x_ptr + xrow[:, None] + (c * sxc)[None, :] + iy * sxh
                                 + ix * sxw, zp_ptr), mask=p_ok[:, None] & k_ok[None, :],
                        other=0)
            # w: (Cout, n_kb * BK) bytes, or half that packed (2 per byte), K in (ky, kx, c)
            # order, zero-padded by conv2d_tap to whole K blocks: rows 16-byte aligned and no
            # K mask, so B comes in 16-byte copies (a mask against K or K / 2, or the
            # (c, ky, kx) strides, kept it to one byte per load: 8 a thread and K block)
            if W_PACKED:
                rh = kb * (BK // 2) + tl.arange(0, BK // 2)
                q = tl.load(w_ptr + rn[:, None] * swn + rh[None, :], mask=j_ok[:, None],
                            other=0)
                q = q.to(tl.int32)
                lo = q & 0xF
                hi = (q >> 4) & 0xF
                lo = lo - ((lo & 8) << 1)
                hi = hi - ((hi & 8) << 1)
                b = tl.join(lo, hi).reshape(BN, BK)
                b = tl.where(k_ok[None, :], b, 0).to(tl.int8)  # an odd K's pad nibble
            else:
                b = tl.load(w_ptr + rn[:, None] * swn + rk[None, :], mask=j_ok[:, None],
                            other=0)
        else:
            iy = iy0 + ty * dh
            ix = ix0 + tx * dw
            # 0 <= iy < H as one unsigned compare (a negative iy wraps above H)
            inside = ((iy.to(tl.uint32, bitcast=True) < H.to(tl.uint32))
                      & (ix.to(tl.uint32, bitcast=True) < W.to(tl.uint32)))
            rc = tc + rc0
            if EVEN_K:
                # BK divides Cg: no load takes a mask (each cost about four instructions per
                # 16-byte copy, a quarter of the loop, sm_90 SASS): rows in the padding or
                # past P read the zero-point page, weight rows past Og the last one (their
                # products land in columns the store drops)
                a = tl.load(tl.where((inside & p_ok)[:, None],
                                     x_ptr + (xrow + iy * sxh + ix * sxw)[:, None]
                                     + (rc * sxc)[None, :], zp_ptr + rc[None, :]))
                b = tl.load(w_ptr + (rnb * swn + ty * swy + tx * swx)[:, None]
                            + (rc * swc)[None, :])
            else:
                c_ok = rc < Cg
                # padding rows read the zero-point page; w is 0 past Cg
                a = tl.load(tl.where(inside[:, None], x_ptr + (xrow + iy * sxh + ix * sxw)[:, None]
                                     + (rc * sxc)[None, :], zp_ptr + rc[None, :]),
                            mask=p_ok[:, None] & c_ok[None, :], other=0)
                b = tl.load(w_ptr + (rn * swn + ty * swy + tx * swx)[:, None]
                            + (rc * swc)[None, :], mask=j_ok[:, None] & c_ok[None, :], other=0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
        if not FLAT and not RUN:  # next: this tap's next channels (ty, tx), or the next tap
            tc += BK
            wrap = tc >= Cg
            tc = tl.where(wrap, 0, tc)
            tx = tl.where(wrap, tx + 1, tx)
            wrap = tx >= KW
            tx = tl.where(wrap, 0, tx)
            ty = tl.where(wrap, ty + 1, ty)
    xz = tl.load(xz_ptr)
    xs = tl.load(xs_ptr)
    rs = tl.load(rs_ptr + rn, mask=j_ok, other=0)
    ws = tl.load(ws_ptr + rn, mask=j_ok, other=0.0)
    acc = acc - xz * rs[None, :]
    if HAS_OFFSET:
        # sum over the window of (x - x_zero), from the per-pixel channel sums: padding
        # taps add 0
        asum = tl.zeros([BM], dtype=tl.int32)
        crow = bi * scb + g * scg
        for t in range(0, TAPS):
            iy = iy0 + (t // KW) * dh
            ix = ix0 + (t % KW) * dw
            inside = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            v = tl.load(cs_ptr + crow + iy * sch + ix * scw, mask=inside & p_ok, other=0)
            asum += tl.where(inside, v - Cg * xz, 0)
        acc += asum[:, None] * tl.load(off_ptr + rn, mask=j_ok, other=0)[None, :]
    y = acc.to(tl.float32) * (xs * ws)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=j_ok, other=0.0)[None, :]
    mask = p_ok[:, None] & j_ok[None, :]
    if RES_MODE != 0:
        roff = (bi * srb + oy * srh + ox * srw)[:, None] + (rn * src)[None, :]
        r = tl.load(res_ptr + roff, mask=mask, other=0).to(tl.float32)
        if RES_MODE == 2:  # int8 residual on its grid: dequantized as (r - zero) * scale
            r = (r - tl.load(rzp_ptr).to(tl.float32)) * tl.load(rsc_ptr)
        y = y + r
    if RELU:  # one max (NaN kept, as torch's clamp_min), not a compare and a select
        y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
    orow = bi * sob + oy * soh + ox * sow
    if OUT_Q:
        osc = tl.load(osc_ptr)
        if HW_FMA:
            # y / osc correctly rounded in three operations: q = y * inv with inv the
            # rounded 1 / osc, the exact residual e = y - q * osc, then q + e * inv
            # (Markstein's correction step). Equal to the IEEE quotient on every float32
            # mantissa of y for 12 divisors (201M quotients, checked once with exact
            # arithmetic where the check itself could round twice) and in
            # tests/test_conv_tap.py near rounding ties; div_rn's general path took about
            # ten instructions a value, a range check and a slow-path branch (sm_90 SASS)
            inv = tl.math.div_rn(1.0, osc)
            q = y * inv
            e = tl.math.fma(-q, osc, y)
            q = tl.math.fma(e, inv, q)
        else:  # the interpreter's fma rounds twice; NumPy's division is IEEE
            q = tl.math.div_rn(y, tl.broadcast_to(osc, [BM, BN]))
        # round half to even, plus the zero point: adding 1.5 * 2^23 leaves no fraction bits
        # for |q| < 2^22 and keeps q's parity (the constant is even), and subtracting the
        # integer 1.5 * 2^23 - zero is exact; larger |q| clamp below to the same ends
        q = (q + 12582912.0) - (12582912.0 - tl.load(ozp_ptr).to(tl.float32))
        q = tl.minimum(tl.maximum(q, -128.0), out_hi)
        tl.store(out_ptr + orow[:, None] + (rn * soc)[None, :], q.to(tl.int8), mask=mask)
    else:
        if ROUND_BF16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            y = tl.where(y != y, y, bits.to(tl.float32, bitcast=True))
        tl.store(out_ptr + orow[:, None] + (rn * soc)[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=mask)


def _strides(t: torch.Tensor) -> tuple:
    """t's strides with 0 for its size-1 dims. torch gives those dims stride 1 in a
    channels-last tensor (a 1x1 conv's weight: (C, 1, 1, 1)), which Triton's launcher turns
    into the constant 1: the kernel's ty * swy then had no known alignment, and every weight
    byte of a 1x1 conv was a load of its own (sm_90 TTGIR: the B tile a synchronous tt.load of
    single bytes, 64 a thread and K block, where 3x3 convs have 16-byte copies)."""
    return tuple(st if n > 1 else 0 for st, n in zip(t.stride(), t.shape))


def _block(n: int, lo: int, hi: int) -> int:
    """The power of two covering n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _tap_config(p: int, cg: int, og: int, taps: int, interp: bool, flat_k: int = 0,
                run_k: int = 0) -> dict:
    """Launch parameters for p output pixels, cg / og channels per group in / out and taps =
    kh * kw: tile BM pixels x BN output channels x BK input channels, warps and pipeline
    stages. Large convs take the fastest tiles of the H200 sweep
    (benchmarks/results/gpu_2026-11-27b/, ResNet-18 layers at batch 256, against the first
    guess (128, 128, 128, 8, 3)): 3x3 with >= 128 channels (64, 128, 64, 4, 3), 0.76-0.99x
    the guess's time; 1x1 to >= 256 channels (256, 128, 64, 8, 3), 0.75x (the best,
    (128, 256, 64, 8, 3) at 0.70x, is within that run's noise of it, and its 64 output
    channels a thread made the fused epilogue spill 48-224 bytes: every column's scale, row
    sum, offset and bias in registers); 64 channels (128, 64, 64, 4, 3), 0.92x. Small
    convs (p < 4096) were not swept. flat_k: K of a conv with fewer than TAP_MIN_CHANNELS
    channels per group (the flattened-K mode, not swept either): BK 32 up to K = 160, else
    64, 8 warps. run_k: kw * C / groups of a conv in the
    window-row mode (RUN_K_RANGE): BK covers it, 8 warps.
    A "maxnreg" key, if given (benchmarks/bench_conv_tiles.py sweeps some), caps the
    registers a thread at launch."""
    if interp:  # few, large programs under the interpreter
        return dict(BM=_block(p, 16, 256), BN=_block(og, 16, 128),
                    BK=_block(run_k, 32, 64) if run_k else _block(flat_k or cg, 32, 128),
                    num_warps=4)
    if run_k:  # the window-row mode: a block is one row of the window, 8 warps as flat_k's
        return dict(BM=128, BN=_block(og, 32, 128), BK=_block(run_k, 32, 64), num_warps=8,
                    num_stages=3)
    if flat_k:
        # 8 warps: each A element has its own window position and mask, and at 4 warps
        # (BN <= 64) the stem's kernel took 255 registers a thread and spilled (416 bytes;
        # 101 local loads per K block); at 8 none, 16% fewer instructions per row
        # (sm_90 SASS), and ResNet-20's 1-channel stem 101 registers instead of 236
        return dict(BM=128, BN=_block(og, 32, 128), BK=32 if flat_k <= 160 else 64,
                    num_warps=8, num_stages=3)
    bk = 64 if cg >= 64 else 32
    if p < 4096:
        return dict(BM=64, BN=_block(og, 32, 128), BK=bk, num_warps=4, num_stages=3)
    if taps == 1 and og >= 256:
        return dict(BM=256, BN=128, BK=bk, num_warps=8, num_stages=3)
    if cg >= 128:
        return dict(BM=64, BN=_block(og, 32, 128), BK=bk, num_warps=4, num_stages=3)
    return dict(BM=128, BN=_block(og, 32, 64), BK=bk, num_warps=4, num_stages=3)


def _kept(cache, key, sources, make):
    """make() through `cache` (a dict the caller keeps, or None): the entry under `key` is
    reused while `sources` are the same tensor objects at the same versions (held here, so
    that no other tensor can take their place), else made again. Inference tensors (made
    under torch.inference_mode, such as a zero point computed at each call there) have no
    version counter: with one among the sources nothing is kept."""
    if cache is None or any(t.is_inference() for t in sources):
        return make()
    stamp = [(t, t._version) for t in sources]
    hit = cache.get(key)
    if hit is not None and len(hit[0]) == len(stamp) and all(
            a is b and va == vb for (a, va), (b, vb) in zip(hit[0], stamp)):
        return hit[1]
    value = make()
    cache[key] = (stamp, value)
    return value


def conv2d_tap(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, stride, padding, dilation,
               groups, relu, out, offset=None, residual=None, res_scale=None, res_zero=None,
               out_scale=None, out_zero=None, out_hi=127, w_packed=False, kernel_size=None,
               cache=None):
    """Runs the kernel into `out` (B, Cout, OH, OW), float or int8 (then out_scale / out_zero
    one-element float32 / int32 tensors), and returns it. x: int8 (B, C, H, W), any strides;
    w: int8 (Cout, C / groups, kh, kw), read channels-last (copied once here otherwise);
    x_scale, w_scale, bias float32, x_zero, w_rowsum, offset int32; residual None or of out's
    shape, float32, or int8 with res_scale / res_zero. The caller checks shapes and dtypes
    (ops.int_gemm for quantized_conv2d, synq.deploy for its fused layers). w_packed: w is
    packed int4, (Cout, ceil(K / 2)) uint8 with K = kh * kw * C / groups in (ky, kx, c)
    order, kernel_size = (kh, kw); it runs the flattened-K mode. cache: None, or a dict
    that one caller (an exported layer) passes at every call, to keep what the call derives
    from w and x_zero alone (the zero-point page, a reordered weight) while they are the same
    tensors, unchanged: three or four small kernel launches a call otherwise."""
    bsz, c, h, wd = x.shape
    cout, cg = w.shape[0], c // groups
    og = cout // groups
    kh, kw = kernel_size if w_packed else (w.shape[2], w.shape[3])
    oh, ow = out.shape[2], out.shape[3]
    p = bsz * oh * ow
    small = cg < TAP_MIN_CHANNELS or w_packed
    run = small and not w_packed and RUN_K_RANGE[0] <= kw * cg <= RUN_K_RANGE[1]
    flat = small and not run
    k = kh * kw * cg
    cfg = _tap_config(p, cg, og, kh * kw, x.device.type == "cpu", k if flat else 0,
                      kw * cg if run else 0)
    bn, bk = cfg["BN"], cfg["BK"]
    n_tiles, n_cb = triton.cdiv(og, bn), triton.cdiv(cg, bk)
    n_kb = kh if run else (triton.cdiv(k, bk) if flat else kh * kw * n_cb)
    if run:
        # (Cout, kh * BK): window row ky at ky * BK, in (kx, c) order, zero past kw * Cg
        w = _kept(cache, ("w_run", bk), [w], lambda: F.pad(
            w.permute(0, 2, 3, 1).reshape(cout, kh, kw * cg),
            (0, bk - kw * cg)).reshape(cout, kh * bk))
        w_strides = (w.stride(0), 0, 0, 0)
    elif flat:
        # (Cout, K) rows in (ky, kx, c) order, zero-padded to whole K blocks (see the kernel)
        def rows():
            w2 = w.contiguous() if w_packed else w.permute(0, 2, 3, 1).reshape(cout, k)
            return F.pad(w2, (0, (n_kb * bk // 2 if w_packed else n_kb * bk) - w2.shape[1]))
        w = _kept(cache, ("w_flat", bk), [w], rows)
        w_strides = (w.stride(0), 0, 0, 0)
    else:
        if w.stride(1) != 1:  # (Cout, C/g, kh, kw) contiguous: read K = (ky, kx, c) in runs
            w = _kept(cache, ("w_cl",), [w],
                      lambda: w.contiguous(memory_format=torch.channels_last))
        w_strides = _strides(w)
    grid = (triton.cdiv(p, cfg["BM"]), groups * n_tiles)
    out_q = out.dtype == torch.int8
    res_mode = 0 if residual is None else (2 if residual.dtype == torch.int8 else 1)
    dummy = w_scale
    # the zero-point page: window positions in the padding read it instead of x, so the A
    # tile goes from memory to the MMA untouched (a select on its values kept it in registers)
    zp = _kept(cache, ("zp", n_cb * bk), [x_zero],
               lambda: x_zero.reshape(1).to(torch.int8).expand(n_cb * bk).contiguous())
    # per-pixel channel sums of each group, for the offset term's window sums
    csum = x.unflatten(1, (groups, cg)).sum(2, dtype=torch.int32) if offset is not None \
        else None
    _conv_tap_kernel[grid](
        x, w, out, x_scale, x_zero, zp, w_scale, w_rowsum, bias if bias is not None else dummy,
        offset if offset is not None else w_rowsum, csum if csum is not None else w_rowsum,
        residual if residual is not None else dummy,
        res_scale if res_scale is not None else dummy,
        res_zero if res_zero is not None else x_zero,
        out_scale if out_scale is not None else dummy,
        out_zero if out_zero is not None else x_zero, float(out_hi),
        p, oh * ow, ow, 1.0 / (oh * ow), 1.0 / ow, h, wd, cg, og, kw, k, kh * kw,
        n_kb, n_tiles, *_strides(x), *w_strides, *_strides(out),
        *(_strides(residual) if residual is not None else (0, 0, 0, 0)),
        *(_strides(csum) if csum is not None else (0, 0, 0, 0)), *stride, *padding, *dilation,
        HAS_BIAS=bias is not None, HAS_OFFSET=offset is not None, RES_MODE=res_mode,
        RELU=bool(relu), OUT_Q=out_q, ROUND_BF16=out.dtype == torch.bfloat16, FLAT=flat,
        RUN=run, CG=cg if small else 0, KWC=kw if small else 0, W_PACKED=bool(w_packed),
        FAST_DIV=p + cfg["BM"] <= FAST_DIV_ROWS, HW_FMA=_st.has_fma(x.device),
        EVEN_K=not small and cg % bk == 0, **cfg)
    return out


def fused_conv2d(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, stride, padding, dilation,
                 groups, relu, offset=None, residual=None, res_scale=None, res_zero=None,
                 out_scale=None, out_zero=None, out_hi=127, cache=None):
    """synq.deploy's fused conv on a GPU: a new output (int8 when out_scale is given, else
    float32) in x's memory format; the arguments as conv2d_tap's (x_scale, x_zero, scales
    and zero points one-element tensors on x's device)."""
    bsz, _, h, wd = x.shape
    kh, kw = w.shape[2], w.shape[3]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = torch.empty((bsz, w.shape[0], oh, ow), device=x.device,
                      dtype=torch.int8 if out_scale is not None else torch.float32,
                      memory_format=conv_memory_format(x))
    if residual is not None and residual.shape != out.shape:
        raise ValueError(f"residual of shape {tuple(residual.shape)} does not match the "
                         f"conv output {tuple(out.shape)}")
    return conv2d_tap(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, stride, padding,
                      dilation, groups, relu, out, offset, residual, res_scale, res_zero,
                      out_scale, out_zero, out_hi, cache=cache)


def s2d_weight(w: torch.Tensor, offset: torch.Tensor | None, channels: int):
    """The weight of a stride-2 conv, int8 (Cout, C, kh, kw) (each row stored minus offset[n]
    where offset is given), for its space-to-depth form (quantize.quantize_s2d: a stride-1
    conv, no padding, on `channels` channels): (Cout, channels, ceil(kh / 2), ceil(kw / 2))
    int8, channels-last, whose channel (2 dy + dx) * C + c at tap (ky, kx) is w's channel c
    at (2 ky + dy, 2 kx + dx). Every other position has real weight 0, stored as -offset[n]
    (so the offset term, which adds offset[n] over the whole window, still cancels there).
    None where a stored value would leave int8 (an offset of -128)."""
    cout, c, kh, kw = w.shape
    o = 0 if offset is None else offset.to(torch.int16).reshape(-1, 1, 1, 1)
    k2h, k2w = (kh + 1) // 2, (kw + 1) // 2
    real = torch.zeros(cout, c, 2 * k2h, 2 * k2w, dtype=torch.int16, device=w.device)
    real[:, :, :kh, :kw] = w.to(torch.int16) + o
    moved = real.reshape(cout, c, k2h, 2, k2w, 2).permute(0, 3, 5, 1, 2, 4)
    full = torch.zeros(cout, channels, k2h, k2w, dtype=torch.int16, device=w.device)
    full[:, :4 * c] = moved.reshape(cout, 4 * c, k2h, k2w)
    stored = full - o
    if int(stored.min()) < -128 or int(stored.max()) > 127:
        return None
    return stored.to(torch.int8).contiguous(memory_format=torch.channels_last)

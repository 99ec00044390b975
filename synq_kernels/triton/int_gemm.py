"""Integer GEMM and convolution in Triton: the "triton" backend of `synq_kernels.int8_matmul`
and `int4_matmul` (the `synq::int_mm` op), `quantized_linear` and `quantized_conv2d`.

One program owns a BM x BN tile of C = A @ B.T and walks K in blocks of BK with tl.dot on
int8 operands and int32 accumulation (int8 tensor-core MMA on sm_80+). Packed int4 operands
(two per byte, element 2i in the low nibble) are loaded as BK/2 bytes per row and unpacked to
int8 in registers (nibble split, sign fix, interleave with tl.join), so they cost 4 bits of
memory traffic; Hopper has no int4 MMA. Ragged M, N and K are handled by masked loads (zeros
add nothing to the sums). A packed weight at a few rows (M <= int_gemv.GEMV_MAX_M) goes to
int_gemv.py's weight-streaming kernel instead.

quantized_linear and quantized_conv2d apply the dequantizing epilogue to the int32 tile before
it leaves the registers, with the same arithmetic as the C++ backends:
out = float32(acc - x_zero * w_rowsum[n]) * (x_scale * w_scale[n]) + bias[n], ReLU, cast.
x_zero is already in the int8 domain (uint8 activations are shifted by -128 in
synq_kernels.ops.int_gemm before any backend runs).

quantized_conv2d with more than one input channel per group runs conv_tap.py's implicit GEMM
(tap-blocked or flattened K; packed int4 weights in the flattened mode), nothing like im2col
written to memory, with the fused epilogue synq.deploy uses on a GPU.
Depthwise-like convolutions (one input channel per group, any channel multiplier) have a
K of only kh * kw, far below the MMA's K of 16 or more, so a direct kernel computes them
instead: a tile of pixels x channels, integer multiply-adds per window tap.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backends
from ..reference.int_gemm import conv_memory_format
from . import conv_gluon, conv_tap, int_gemm_gluon, int_gemv
from .int4_ptx import unpack_signed
from .conv_tap import _block


# No @triton.jit helpers: they are slow under the interpreter (as in fake_quant.py).

# Packed int4 to int8 on a GPU, four bytes per register ($2 in; $0 the low nibbles, $1 the
# high ones): see int4_ptx.py.
UNPACK_SIGNED = tl.constexpr("{\n.reg .b32 t;\n" + unpack_signed("$2", "$0", "$1", "t") + "}")
UNPACK_UNSIGNED = tl.constexpr("""{
and.b32 $0, $2, 0x0F0F0F0F;
shr.u32 $1, $2, 4;
and.b32 $1, $1, 0x0F0F0F0F;
}""")
# KH = ceil(K / 2), a packed row's bytes, is an argument of its own so that Triton can
# specialize it as a multiple of 16: a mask against (K + 1) // 2 is not provably uniform over
# a 16-byte vector, and that kept the packed loads out of cp.async, unpipelined (sm_90 TTGIR).
@triton.jit
def _int_mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, KH, sam, sbn, scm,
                   A_PACKED: tl.constexpr, A_SIGNED: tl.constexpr, B_PACKED: tl.constexpr,
                   ASM: tl.constexpr, K_ODD: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   GROUP_M: tl.constexpr):
    # One grid axis; programs run in groups of GROUP_M row tiles that sweep the column
    # tiles together, so that a group's A rows and B columns are reused from L2.
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for k0 in range(0, K, BK):
        if A_PACKED:
            rh = k0 // 2 + tl.arange(0, BK // 2)
            p = tl.load(a_ptr + rm[:, None] * sam + rh[None, :],
                        mask=m_ok[:, None] & (rh[None, :] < KH), other=0)
            if ASM:
                lo, hi = tl.inline_asm_elementwise(
                    UNPACK_SIGNED if A_SIGNED else UNPACK_UNSIGNED, "=r,=r,r", [p],
                    dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
                a = tl.join(lo, hi).reshape(BM, BK)
            else:
                p = p.to(tl.int32)
                lo = p & 0xF
                hi = (p >> 4) & 0xF
                if A_SIGNED:
                    lo = lo - ((lo & 8) << 1)
                    hi = hi - ((hi & 8) << 1)
                a = tl.join(lo, hi).reshape(BM, BK).to(tl.int8)
            # The pad nibble of an odd K is cleared in b's bytes (below).
        else:
            rk = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + rm[:, None] * sam + rk[None, :],
                        mask=m_ok[:, None] & (rk[None, :] < K), other=0)
        if B_PACKED:
            rh = k0 // 2 + tl.arange(0, BK // 2)
            q = tl.load(b_ptr + rn[:, None] * sbn + rh[None, :],
                        mask=n_ok[:, None] & (rh[None, :] < KH), other=0)
            if A_PACKED and K_ODD:
                # an odd K's pad nibble (any value) meets a's, which is not 0 either: clear
                # it here (with an int8 a, masked past K, the product is 0 anyway)
                q = tl.where(rh[None, :] < KH - 1, q, q & 0xF)
            if ASM:
                lo, hi = tl.inline_asm_elementwise(UNPACK_SIGNED, "=r,=r,r", [q],
                                                   dtype=(tl.int8, tl.int8), is_pure=True,
                                                   pack=4)
                b = tl.join(lo, hi).reshape(BN, BK)
            else:
                q = q.to(tl.int32)
                lo = q & 0xF
                hi = (q >> 4) & 0xF
                lo = lo - ((lo & 8) << 1)
                hi = hi - ((hi & 8) << 1)
                b = tl.join(lo, hi).reshape(BN, BK).to(tl.int8)
        else:
            rk = k0 + tl.arange(0, BK)
            b = tl.load(b_ptr + rn[:, None] * sbn + rk[None, :],
                        mask=n_ok[:, None] & (rk[None, :] < K), other=0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def int_mm(a, b, k, a_packed, a_signed, b_packed):
    if b_packed and a.shape[0] <= int_gemv.GEMV_MAX_M:  # batch-1 style: stream the weight
        return int_gemv.int_gemv(a, b, k, a_packed, a_signed)
    a = a.contiguous()
    b = b.contiguous()
    if not (a_packed or b_packed) and int_gemm_gluon.enabled() and \
            int_gemm_gluon.usable(a, b):  # opt-in: asynchronous int8 wgmma on sm_90
        return int_gemm_gluon.int8_matmul(a, b)
    m, n = a.shape[0], b.shape[0]
    c = torch.empty(m, n, dtype=torch.int32, device=a.device)
    cfg = _mm_config(m, n, k, a.device.type == "cpu")
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    _int_mm_kernel[grid](a, b, c, m, n, k, (k + 1) // 2, a.stride(0), b.stride(0), c.stride(0),
                         A_PACKED=a_packed, A_SIGNED=a_signed, B_PACKED=b_packed,
                         ASM=not _interpreting(a), K_ODD=k % 2 == 1, **cfg)
    return c


def _mm_config(m: int, n: int, k: int, interp: bool) -> dict:
    """Launch parameters of _int_mm_kernel (tiles, L2 group, warps, stages); the ones timed
    in the first GPU runs (gpu_2026-11-27: 1.28x torch._int_mm at 4096^3 on an H100).
    _quantized_linear_kernel takes the same ones. benchmarks/bench_gemm_tiles.py times
    alternatives on a GPU, for both kernels."""
    if interp:  # interpreter: few, large programs
        return dict(BM=64, BN=64, BK=64, GROUP_M=1)
    bm = 16 if m <= 16 else (64 if m <= 64 else 128)
    return dict(BM=bm, BN=128, BK=128, GROUP_M=1, num_warps=4, num_stages=3)


# The epilogue, written out in each kernel (no helpers, see above). bfloat16 stores: the
# interpreter's float32 -> bfloat16 cast truncates and the GPU's rounds to nearest even; with
# ROUND_BF16 the value is first rounded to the nearest bfloat16 in float32 bits (ties to even,
# NaN kept), after which both casts are exact and give torch's bits.


@triton.jit
def _quantized_linear_kernel(x_ptr, w_ptr, out_ptr, xs_ptr, xz_ptr, ws_ptr, rs_ptr, bias_ptr,
                             M, N, K, KH, sxm, swn, som,
                             W_PACKED: tl.constexpr, HAS_BIAS: tl.constexpr,
                             RELU: tl.constexpr, ROUND_BF16: tl.constexpr,
                             ASM: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                             GROUP_M: tl.constexpr):
    # the int8 GEMM's program order (L2 groups of GROUP_M row tiles, see _int_mm_kernel)
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :],
                    mask=m_ok[:, None] & (rk[None, :] < K), other=0)
        if W_PACKED:
            rh = k0 // 2 + tl.arange(0, BK // 2)
            q = tl.load(w_ptr + rn[:, None] * swn + rh[None, :],
                        mask=n_ok[:, None] & (rh[None, :] < KH), other=0)
            # an odd K's pad nibble meets x = 0 (x is masked past K)
            if ASM:
                lo, hi = tl.inline_asm_elementwise(UNPACK_SIGNED, "=r,=r,r", [q],
                                                   dtype=(tl.int8, tl.int8), is_pure=True,
                                                   pack=4)
                b = tl.join(lo, hi).reshape(BN, BK)
            else:
                q = q.to(tl.int32)
                lo = q & 0xF
                hi = (q >> 4) & 0xF
                lo = lo - ((lo & 8) << 1)
                hi = hi - ((hi & 8) << 1)
                b = tl.join(lo, hi).reshape(BN, BK).to(tl.int8)
        else:
            b = tl.load(w_ptr + rn[:, None] * swn + rk[None, :],
                        mask=n_ok[:, None] & (rk[None, :] < K), other=0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
    xz = tl.load(xz_ptr + rm, mask=m_ok, other=0)
    xs = tl.load(xs_ptr + rm, mask=m_ok, other=0.0)
    rs = tl.load(rs_ptr + rn, mask=n_ok, other=0)
    ws = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
    y = (acc - xz[:, None] * rs[None, :]).to(tl.float32) * (xs[:, None] * ws[None, :])
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)
    if ROUND_BF16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        y = tl.where(y != y, y, bits.to(tl.float32, bitcast=True))
    tl.store(out_ptr + rm[:, None] * som + rn[None, :], y.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv_depthwise_kernel(x_ptr, w_ptr, out_ptr, xs_ptr, xz_ptr, ws_ptr, rs_ptr, bias_ptr,
                           P, OHW, OW, inv_ohw, inv_ow, H, W, Cout, Og, KH, KW,
                           sxb, sxc, sxh, sxw, swn, swy, swx, sob, soc, soh, sow,
                           sh, sw, ph, pw, dh, dw,
                           W_PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
                           ROUND_BF16: tl.constexpr, FAST_DIV: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr):
    # One input channel per group: output channel n reads input channel n // Og only.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rp = pid_m * BM + tl.arange(0, BM)
    p_ok = rp < P
    if FAST_DIV:  # the row split by float reciprocals, exact below 2^22 rows (conv_tap.py)
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
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < Cout
    xtile = x_ptr + (bi * sxb)[:, None] + ((rn // Og) * sxc)[None, :]
    xz = tl.load(xz_ptr)
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for ky in range(0, KH):
        iy = iy0 + ky * dh
        y_ok = (iy >= 0) & (iy < H)
        for kx in range(0, KW):
            ix = ix0 + kx * dw
            inside = y_ok & (ix >= 0) & (ix < W)
            a = tl.load(xtile + (iy * sxh + ix * sxw)[:, None],
                        mask=(inside & p_ok)[:, None] & n_ok[None, :], other=0)
            a = tl.where(inside[:, None], a.to(tl.int32), xz)
            if W_PACKED:  # (Cout, ceil(KH*KW / 2)) bytes, taps in (ky, kx) order
                t = ky * KW + kx
                q = tl.load(w_ptr + rn * swn + t // 2, mask=n_ok, other=0).to(tl.int32)
                q = (q >> ((t % 2) * 4)) & 0xF
                wv = q - ((q & 8) << 1)
            else:
                wv = tl.load(w_ptr + rn * swn + ky * swy + kx * swx, mask=n_ok,
                             other=0).to(tl.int32)
            acc += a * wv[None, :]
    xs = tl.load(xs_ptr)
    rs = tl.load(rs_ptr + rn, mask=n_ok, other=0)
    ws = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
    y = (acc - xz * rs[None, :]).to(tl.float32) * (xs * ws)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)
    if ROUND_BF16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        y = tl.where(y != y, y, bits.to(tl.float32, bitcast=True))
    orow = bi * sob + oy * soh + ox * sow
    tl.store(out_ptr + orow[:, None] + (rn * soc)[None, :], y.to(out_ptr.dtype.element_ty),
             mask=p_ok[:, None] & n_ok[None, :])


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"  # Triton takes CPU tensors only under its interpreter


def _check_epilogue_args(who, x_scale, x_zero, w_scale, w_rowsum, bias, m, n):
    """The op hands over contiguous float32 scales and int32 zero points / row sums, x's per
    row (m of them; 1 for conv) and w's per output channel (n)."""
    args = [("x_scale", x_scale, torch.float32, m), ("x_zero", x_zero, torch.int32, m),
            ("w_scale", w_scale, torch.float32, n), ("w_rowsum", w_rowsum, torch.int32, n)]
    if bias is not None:
        args.append(("bias", bias, torch.float32, n))
    for name, t, dt, numel in args:
        if t.dtype != dt or not t.is_contiguous() or t.numel() != numel:
            raise ValueError(f"synq {who} (triton backend): {name} must be a contiguous {dt} "
                             f"tensor of {numel} elements, got {t.dtype} {tuple(t.shape)}")


def quantized_linear(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, relu, out_dtype,
                     w_packed):
    if x.dtype != torch.int8 or x.dim() != 2:
        raise ValueError("synq quantized_linear (triton backend): x must be 2-D int8 (uint8 "
                         f"activations are shifted by the op's caller), got {x.dtype} "
                         f"{tuple(x.shape)}")
    x = x.contiguous()
    w = w.contiguous()
    m, k = x.shape
    n = w.shape[0]
    _check_epilogue_args("quantized_linear", x_scale, x_zero, w_scale, w_rowsum, bias, m, n)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if _interpreting(x):  # few, large programs
        cfg = dict(BM=_block(m, 16, 256), BN=_block(n, 16, 256), BK=_block(k, 16, 256),
                   GROUP_M=1)
    else:
        # the int8 GEMM's tiles: its sweep sets them (8 warps here before, at 148 registers
        # a thread: one program per SM; 4 warps fit two, as _int_mm_kernel's do)
        cfg = _mm_config(m, n, k, False)
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    _quantized_linear_kernel[grid](
        x, w, out, x_scale, x_zero, w_scale, w_rowsum, bias if bias is not None else w_scale,
        m, n, k, (k + 1) // 2, x.stride(0), w.stride(0), out.stride(0),
        W_PACKED=bool(w_packed), HAS_BIAS=bias is not None, RELU=bool(relu),
        ROUND_BF16=out_dtype == torch.bfloat16, ASM=not _interpreting(x), **cfg)
    return out


def conv2d(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, stride, padding, dilation, groups,
           relu, out_dtype, w_packed=False, kernel_size=None):
    """The triton quantized_conv2d, also for packed int4 weights (w_packed): then w is
    (Cout, ceil(K / 2)) uint8, K = kh * kw * C / groups packed in (ky, kx, c) order (see the
    module docstring), and kernel_size = (kh, kw); int8 w is (Cout, C / groups, kh, kw) with
    any strides."""
    if x.dtype != torch.int8 or x.dim() != 4:
        raise ValueError("synq quantized_conv2d (triton backend): x must be 4-D int8, got "
                         f"{x.dtype} {tuple(x.shape)}")
    bsz, c, h, wd = x.shape
    cout = w.shape[0]
    cg = c // groups
    og = cout // groups
    if w_packed:
        kh, kw = kernel_size
        k = kh * kw * cg
        if w.dtype != torch.uint8 or tuple(w.shape) != (cout, (k + 1) // 2):
            raise ValueError(f"synq quantized_conv2d (triton backend): packed w must be uint8 "
                             f"of shape ({cout}, {(k + 1) // 2}), got {w.dtype} "
                             f"{tuple(w.shape)}")
        w = w.contiguous()
        swn, swc, swy, swx = w.stride(0), 0, 0, 0
    else:
        kh, kw = w.shape[2], w.shape[3]
        k = kh * kw * cg
        swn, swc, swy, swx = w.stride()
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    _check_epilogue_args("quantized_conv2d", x_scale, x_zero, w_scale, w_rowsum, bias, 1, cout)
    out = torch.empty((bsz, cout, oh, ow), dtype=out_dtype, device=x.device,
                      memory_format=conv_memory_format(x))
    p = bsz * oh * ow
    interp = _interpreting(x)
    common = dict(HAS_BIAS=bias is not None, RELU=bool(relu),
                  ROUND_BF16=out_dtype == torch.bfloat16, W_PACKED=bool(w_packed))
    ptrs = (x, w, out, x_scale, x_zero, w_scale, w_rowsum,
            bias if bias is not None else w_scale)
    geom = (sh, sw, ph, pw, dh, dw)
    if cg == 1:
        if interp:
            bm, bn, warps = _block(p, 16, 1024), _block(cout, 16, 128), 4
        else:
            bm, bn, warps = 64, _block(cout, 16, 64), 4
        grid = (triton.cdiv(p, bm), triton.cdiv(cout, bn))
        _conv_depthwise_kernel[grid](
            *ptrs, p, oh * ow, ow, 1.0 / (oh * ow), 1.0 / ow, h, wd, cout, og, kh, kw,
            *x.stride(), swn, swy, swx, *out.stride(), *geom,
            FAST_DIV=p + bm <= conv_tap.FAST_DIV_ROWS, BM=bm, BN=bn, num_warps=warps,
            **common)
        return out
    if (conv_gluon.enabled() and out_dtype == torch.float32 and x_scale.numel() == 1
            and x_zero.numel() == 1 and conv_gluon.usable(x, w, stride, padding, dilation,
                                                          groups, None, w_packed)):
        # opt-in: TMA operands and asynchronous int8 wgmma on sm_90
        return conv_gluon.conv2d(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, relu)
    # (cg > 1 here) conv_tap's implicit GEMM: tap-blocked, or flattened K (packed int4 too)
    return conv_tap.conv2d_tap(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, stride, padding,
                               dilation, groups, relu, out, w_packed=bool(w_packed),
                               kernel_size=(kh, kw))


def quantized_conv2d(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, stride, padding, dilation,
                     groups, relu, out_dtype):
    return conv2d(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, stride, padding, dilation,
                  groups, relu, out_dtype)


backends.register("int_mm", "triton", int_mm)
backends.register("quantized_linear", "triton", quantized_linear)
backends.register("quantized_conv2d", "triton", quantized_conv2d)
# Triton first for convs on a GPU: with CUDA graphs (the exported model's default) the whole
# integer ResNet-20 / ResNet-18 ran faster on it than on the cuda backend at every batch
# measured (H200, gpu_2026-11-27: ResNet-20 1.17-2.53 ms vs 1.78-4.37 ms, ResNet-18 within
# 1-7%), and only Triton has the fused requantizing conv (conv_tap.py).
backends.set_preference("quantized_conv2d", "cuda", ("triton", "cuda", "reference"))

"""Static int8 quantization of a float32 tensor in one pass, for synq.deploy on a GPU:

    q = clamp(round_half_even(x / scale) + zero, lo, hi) as int8

with a one-element float32 scale and an integer zero point (one-element tensors on x's
device, read by the kernel: no host copy, so CUDA graphs can capture it). The output has x's
memory format (x must be dense: contiguous in some dimension order), and the kernel walks x's
storage in order, so reads and writes are contiguous whatever the layout.

The same steps as PyTorch ops (torch.div, round_, add_, clamp_, .to(torch.int8)) made four
passes over the float32 tensor plus the cast: about 1.4 GB of traffic for ResNet-18's input
at batch 256 (256 x 3 x 224 x 224), against 0.19 GB here. Values are the ops' exactly:
x / scale is the IEEE quotient (on a GPU a reciprocal and two fused multiply-adds, as in
conv_tap.py's epilogue; under the interpreter tl.math.div_rn), and
round-half-even plus the zero point is one add pair. Special values too: +-inf (in x, or
a quotient that overflows) clamps to hi / lo, a finite x over an infinite scale is 0, and NaN
(in x, or inf / inf) gives 0, as PyTorch's clamp (which keeps NaN) and int8 cast do."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import synq_kernels.triton as _st

BLOCK = 2048


@triton.jit
def _to_grid(v, s, zf, lo, hi, HW_FMA: tl.constexpr, BLOCK: tl.constexpr):
    """v / s rounded half to even, plus the integer zero point zf (float), clamped to
    [lo, hi]: PyTorch's div, round, add and clamp, to the bit."""
    if HW_FMA:  # see conv_tap.py's epilogue
        inv = tl.math.div_rn(1.0, s)
        q0 = v * inv
        e = tl.math.fma(-q0, s, v)
        q = tl.math.fma(e, inv, q0)
        # the correction is NaN where q0 is infinite (x infinite, or an overflowing quotient)
        # or s is (0 * inf): q0 is then the IEEE quotient itself (+-inf, +-0, or NaN for
        # inf / inf)
        q = tl.where(q == q, q, q0)
    else:  # the interpreter's fma rounds twice; NumPy's division is IEEE
        q = tl.math.div_rn(v, tl.broadcast_to(s, [BLOCK]))
    # round half to even (exact for |q| < 2^22; larger |q| clamp to the same ends) and the
    # integer zero point: (q + 1.5 * 2^23) - (1.5 * 2^23 - zero)
    q = (q + 12582912.0) - (12582912.0 - zf)
    # NaN (x NaN, or inf / inf from the grid of a range with an infinite end) goes to 0, as
    # PyTorch's clamp (which keeps NaN) and cast to int8 give it; the GPU's max / min (and
    # the interpreter's, np.fmax / np.fmin) would turn it into lo
    return tl.where(q != q, 0.0, tl.minimum(tl.maximum(q, lo), hi))


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, s_ptr, z_ptr, n, lo, hi, HW_FMA: tl.constexpr,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    q = _to_grid(x, tl.load(s_ptr), tl.load(z_ptr).to(tl.float32), lo, hi, HW_FMA, BLOCK)
    tl.store(out_ptr + offs, q.to(tl.int8), mask=ok)


def _dense(x: torch.Tensor) -> bool:
    """Whether x's elements fill x.numel() consecutive places of its storage (contiguous in
    some order of its dims; size-1 dims do not count)."""
    expect = 1
    for stride, size in sorted((st, n) for st, n in zip(x.stride(), x.shape) if n != 1):
        if stride != expect:
            return False
        expect *= size
    return True


def usable(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> bool:
    """Whether quantize_static takes these arguments: x float32 and dense, scale and zero
    one-element tensors on x's device (the PyTorch ops serve every other case)."""
    return x.dtype == torch.float32 and x.numel() > 0 and _dense(x) and _grid_ok(x, scale, zero)


def _grid_ok(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> bool:
    return (isinstance(scale, torch.Tensor) and isinstance(zero, torch.Tensor)
            and scale.numel() == 1 and zero.numel() == 1 and scale.dtype == torch.float32
            and scale.device == x.device and zero.device == x.device)


def quantize_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int,
                    hi: int) -> torch.Tensor:
    """int8 of x on the grid (scale, zero), clamped to [lo, hi], in x's memory format; the
    arguments as `usable` requires, zero an integer value (synq.deploy's zero points are)."""
    if not usable(x, scale, zero):
        raise ValueError("quantize_static: x must be a dense float32 tensor and scale / zero "
                         "one-element tensors (scale float32) on its device")
    out = torch.empty_strided(x.shape, x.stride(), dtype=torch.int8, device=x.device)
    n = x.numel()
    _quantize_kernel[(triton.cdiv(n, BLOCK),)](
        x, out, scale, zero, n, float(lo), float(hi), HW_FMA=_st.has_fma(x.device),
        BLOCK=BLOCK)
    return out


# Space-to-depth: a stride-2 conv of C <= 4 channels as a stride-1 conv of S2D_CHANNELS
# (synq.deploy runs ResNet-18's 7x7 stem so). Its window rows are then 16-byte runs: 4 pixels
# of 16 bytes for a 7x7 kernel (4x4 after the transform), one 64-byte K block each, copied
# 16 bytes at a time; 3-byte pixels were loaded a byte at a time into registers and stored
# to shared memory a byte at a time (sm_90 SASS: 180 instructions a K block of 32, against
# 64 cycles of tensor-core work).
S2D_CHANNELS = 16


@triton.jit
def _quantize_s2d_kernel(x_ptr, out_ptr, s_ptr, z_ptr, H, W, H2, W2, sxb, sxc, sxh, sxw,
                         soh, pad_h, pad_w, lo, hi, C: tl.constexpr, CO: tl.constexpr,
                         HW_FMA: tl.constexpr, BLOCK: tl.constexpr):
    # one program: BLOCK bytes of one output row (b, y2), pixel-major, CO channels a pixel
    row = tl.program_id(0)
    b = row // H2
    y2 = row % H2
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    x2 = offs // CO
    co = offs % CO
    d = co // C          # which of the 2 x 2 pixels: (dy, dx) = (d // 2, d % 2)
    c = co % C
    iy = 2 * y2 + d // 2 - pad_h
    ix = 2 * x2 + d % 2 - pad_w
    ok = x2 < W2
    real = ok & (d < 4) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    v = tl.load(x_ptr + b.to(tl.int64) * sxb + c * sxc + iy * sxh + ix * sxw, mask=real,
                other=0.0)
    zf = tl.load(z_ptr).to(tl.float32)
    q = _to_grid(v, tl.load(s_ptr), zf, lo, hi, HW_FMA, BLOCK)
    # padding and the channels past 4 C hold the zero point (the real zero)
    q = tl.where(real, q, zf)
    # a channels-last row is W2 * CO contiguous bytes: byte offs of row (b, y2)
    tl.store(out_ptr + b.to(tl.int64) * (H2 * soh) + y2 * soh + offs, q.to(tl.int8), mask=ok)


def s2d_size(n: int, pad: int) -> int:
    """The space-to-depth size of an input dimension n padded by `pad` on both sides."""
    return (n + 2 * pad + 1) // 2


def quantize_s2d(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int,
                 padding: tuple) -> torch.Tensor:
    """x (B, C, H, W) float32, C <= 4, quantized as quantize_static, padded by `padding`
    = (ph, pw) with the zero point and rearranged space-to-depth: int8 (B, S2D_CHANNELS,
    ceil((H + 2 ph) / 2), ceil((W + 2 pw) / 2)), channels-last, where channel
    (2 dy + dx) * C + c of pixel (y, x) is channel c of padded pixel (2 y + dy, 2 x + dx)
    (the zero point past the padded input and for channels past 4 C)."""
    if (x.dtype != torch.float32 or x.dim() != 4 or not 1 <= x.shape[1] <= 4
            or x.numel() == 0 or not _grid_ok(x, scale, zero)):
        raise ValueError("quantize_s2d: x must be a float32 (B, C <= 4, H, W) tensor and "
                         "scale / zero one-element tensors (scale float32) on its device")
    bsz, c, h, w = x.shape
    ph, pw = padding
    h2, w2 = s2d_size(h, ph), s2d_size(w, pw)
    out = torch.empty((bsz, S2D_CHANNELS, h2, w2), dtype=torch.int8, device=x.device,
                      memory_format=torch.channels_last)
    # 16 bytes a thread (4 warps) at 2048: one 16-byte store per thread (8 at 1024)
    block = min(2048, triton.next_power_of_2(w2 * S2D_CHANNELS))
    grid = (bsz * h2, triton.cdiv(w2 * S2D_CHANNELS, block))
    _quantize_s2d_kernel[grid](
        x, out, scale, zero, h, w, h2, w2, *x.stride(), out.stride(2), ph, pw,
        float(lo), float(hi), C=c, CO=S2D_CHANNELS, HW_FMA=_st.has_fma(x.device),
        BLOCK=block)
    return out

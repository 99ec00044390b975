"""Gaussian low-pass filter in Triton: the "triton" backend of `synq_kernels.lowpass`.

The Gaussian filter is y = A_H x A_W per image (A: the real symmetric circulants of
`synq_kernels.ops.lowpass.gaussian_matrix`), computed by one kernel that reads x once and
writes y once; the matrices (at most 256 KB each) stay in the L2 cache.

A program owns a block of BM output rows of one image. It accumulates T = A_H[rows, :] @ x over
blocks of BK input rows, holding T (BM x W, W padded to a power of two, at most 256) in
registers, then writes y[rows, :] = T @ A_W one panel of BN columns at a time. The row blocks
of one image are neighbours in the grid, so they find x and the matrices in L2.

Sizes that are not powers of two (7, 31, 33, 224, ...) are padded by masked loads (zeros), so
the padding adds nothing to the products. On GPUs the products run on tensor cores in TF32
with float32 accumulation (`GPU_PRECISION`): an error of about 1e-3 of max|x|, well below
what the filter is for (removing noise from synthetic images) and below the bfloat16 step;
"tf32x3" gives float32 accuracy at three times the tensor-core work, "ieee" without tensor
cores. Under the interpreter the products are float32 ("ieee").

The ideal (0/1) mask has no separable form, and past 256 pixels a side the FFT costs less
than the matrices: both use the real-FFT path (`synq_kernels.ops.lowpass.lowpass_fft`) on the
same device.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .. import backends
from ..ops.lowpass import MAX_SEPARABLE_SIZE, gaussian_matrix, lowpass_fft, use_separable

GPU_PRECISION = "tf32"


# As in fake_quant.py: no @triton.jit helpers (slow under the interpreter), and bfloat16
# stores rounded to nearest even by hand (the interpreter's cast truncates).
@triton.jit
def _lowpass_gaussian_kernel(x_ptr, y_ptr, ah_ptr, aw_ptr, H, W, n_mblocks,
                             BM: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr,
                             BN: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
                             ROUND_BF16: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    mb = pid % n_mblocks  # row blocks of one image are neighbours: they share x in L2
    img = pid // n_mblocks
    base = img * H * W
    rm = mb * BM + tl.arange(0, BM)
    cw = tl.arange(0, BW)
    m_ok = rm < H
    w_ok = cw < W
    t = tl.zeros([BM, BW], dtype=tl.float32)
    for k0 in range(0, H, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < H
        a = tl.load(ah_ptr + rm[:, None] * H + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        xt = tl.load(x_ptr + base + rk[:, None] * W + cw[None, :],
                     mask=k_ok[:, None] & w_ok[None, :], other=0.0).to(tl.float32)
        t = tl.dot(a, xt, t, input_precision=PRECISION)
    for n0 in range(0, W, BN):
        rn = n0 + tl.arange(0, BN)
        n_ok = rn < W
        b = tl.load(aw_ptr + cw[:, None] * W + rn[None, :], mask=w_ok[:, None] & n_ok[None, :],
                    other=0.0)
        yv = tl.dot(t, b, input_precision=PRECISION)
        if ROUND_BF16:
            bits = yv.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            yv = tl.where(yv != yv, yv, bits.to(tl.float32, bitcast=True))
        tl.store(y_ptr + base + rm[:, None] * W + rn[None, :], yv.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _device_guard(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def lowpass_gaussian(x: torch.Tensor, d0: float) -> torch.Tensor:
    """y = A_H x A_W over the last two dims of x (any batch shape), in x's dtype."""
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    H, W = x.shape[-2:]
    bw = max(16, _pow2(W))
    if bw > MAX_SEPARABLE_SIZE:
        raise ValueError(f"synq lowpass (triton): images wider than {MAX_SEPARABLE_SIZE} take "
                         f"the FFT path, got W = {W}")
    images = x.numel() // (H * W)
    a_h = gaussian_matrix(H, d0, x.device, torch.float32)
    a_w = gaussian_matrix(W, d0, x.device, torch.float32)
    interpreted = not x.is_cuda
    precision = "ieee" if interpreted else GPU_PRECISION
    # 64-bit offsets past 2^31 elements; always under the interpreter, whose int32 overflow
    # checks cost milliseconds per operation.
    int64 = interpreted or x.numel() >= 2 ** 31 - 2 ** 20
    bk = max(16, min(32, _pow2(H)))
    # On the GPU T (BM x BW float32) lives in registers: at most 16K floats over 8 warps; two
    # pipeline stages keep the shared memory (x tiles, then T and A_W panels) well under
    # 228 KB. The interpreter prefers few, large programs.
    bm = max(16, min(_pow2(H), 256 if interpreted else 64))
    bn = bw if interpreted else min(bw, 64 if bw <= 128 else 32)
    n_mblocks = triton.cdiv(H, bm)
    with _device_guard(x):
        _lowpass_gaussian_kernel[(images * n_mblocks,)](
            x, y, a_h, a_w, H, W, n_mblocks, BM=bm, BW=bw, BK=bk, BN=bn,
            PRECISION=precision, INT64=int64, ROUND_BF16=x.dtype == torch.bfloat16,
            num_warps=8 if bm * bw >= 8192 else 4, num_stages=2)
    return y


def lowpass_filter(x: torch.Tensor, d0: float, mask: str) -> torch.Tensor:
    if not use_separable(x, mask):
        return lowpass_fft(x, d0, mask)
    return lowpass_gaussian(x, d0)


backends.register("lowpass", "triton", lowpass_filter)

"""2-D max pooling of int8 tensors, for synq.deploy on a GPU (ResNet-18's max-pool after the
stem, in fused int8 mode): PyTorch has no int8 max-pool on CUDA, and going through float16
(int8 -> float16, pool, -> int8) moved about 1.3 GB at batch 256 (a 256 x 64 x 112 x 112
input), against 0.26 GB read and written here.

One program owns BP output pixels x BC channels and takes the maximum over the window's
positions inside the input (padding never wins, as PyTorch's -inf padding), loading BC
channels of a pixel at once: contiguous bytes on a channels-last input. Output shape as
PyTorch's (ceil_mode included), in x's memory format (channels-last or contiguous)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.int_gemm import _pair
from ..reference.int_gemm import conv_memory_format


@triton.jit
def _max_pool_kernel(x_ptr, out_ptr, P, C, OHW, OW, H, W, sxb, sxc, sxh, sxw, sob, soc, soh,
                     sow, sh, sw, ph, pw, dh, dw, KH: tl.constexpr, KW: tl.constexpr,
                     BP: tl.constexpr, BC: tl.constexpr):
    rp = tl.program_id(0) * BP + tl.arange(0, BP)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    p_ok = rp < P
    c_ok = rc < C
    b = rp // OHW
    rem = rp % OHW
    oy = rem // OW
    ox = rem % OW
    iy0 = oy * sh - ph
    ix0 = ox * sw - pw
    xrow = b.to(tl.int64) * sxb
    # every window holds at least one input position (PyTorch's limits on padding and its
    # ceil_mode rule), so -128 (int8's least) never shows where there is an input
    acc = tl.full([BP, BC], -128, tl.int32)
    for ky in tl.static_range(KH):
        iy = iy0 + ky * dh
        for kx in tl.static_range(KW):
            ix = ix0 + kx * dw
            ok = p_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            v = tl.load(x_ptr + (xrow + iy * sxh + ix * sxw)[:, None] + (rc * sxc)[None, :],
                        mask=ok[:, None] & c_ok[None, :], other=-128)
            acc = tl.maximum(acc, v.to(tl.int32))
    orow = b.to(tl.int64) * sob + oy * soh + ox * sow
    tl.store(out_ptr + orow[:, None] + (rc * soc)[None, :], acc.to(tl.int8),
             mask=p_ok[:, None] & c_ok[None, :])


def _out_size(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """PyTorch's pooling output size (pooling_output_shape): with ceil_mode the last window
    must start inside the input or its left padding."""
    out = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= n + p:
        out -= 1
    return out


def max_pool2d_int8(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                    ceil_mode: bool = False) -> torch.Tensor:
    """F.max_pool2d of an int8 (B, C, H, W) tensor (no indices), as int8, in x's memory
    format; the arguments as F.max_pool2d's (stride None or empty: the kernel size)."""
    if x.dtype != torch.int8 or x.dim() != 4:
        raise ValueError(f"max_pool2d_int8 takes an int8 (B, C, H, W) tensor, got "
                         f"{x.dtype} of shape {tuple(x.shape)}")
    (kh, kw), (ph, pw), (dh, dw) = (_pair("kernel_size", kernel_size),
                                    _pair("padding", padding), _pair("dilation", dilation))
    sh, sw = _pair("stride", stride) if stride not in (None, (), []) else (kh, kw)
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("max_pool2d_int8: kernel size, stride and dilation must be positive, "
                         "padding non-negative")
    if ph > kh // 2 or pw > kw // 2:   # as PyTorch checks it
        raise ValueError(f"max_pool2d_int8: padding {(ph, pw)} is more than half the kernel "
                         f"size ({kh}x{kw})")
    bsz, c, h, w = x.shape
    oh = _out_size(h, kh, sh, ph, dh, ceil_mode)
    ow = _out_size(w, kw, sw, pw, dw, ceil_mode)
    if oh < 1 or ow < 1:
        raise ValueError(f"max_pool2d_int8: output size {oh}x{ow} for an input of {h}x{w}")
    out = torch.empty((bsz, c, oh, ow), dtype=torch.int8, device=x.device,
                      memory_format=conv_memory_format(x))
    p = bsz * oh * ow
    interp = x.device.type == "cpu"
    bp, bc = (64, triton.next_power_of_2(min(c, 256))) if interp else (32, 64)
    grid = (triton.cdiv(p, bp), triton.cdiv(c, bc))
    _max_pool_kernel[grid](x, out, p, c, oh * ow, ow, h, w, *x.stride(), *out.stride(),
                           sh, sw, ph, pw, dh, dw, KH=kh, KW=kw, BP=bp, BC=bc,
                           num_warps=4)
    return out

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

from .. import backends
from ..reference.int_gemm import conv_memory_format
from ..reference.pool import PoolGeometry


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


def max_pool2d_int8(x: torch.Tensor, g: PoolGeometry) -> torch.Tensor:
    """The "triton" backend of synq_kernels.max_pool2d_int8 (geometry g from
    synq_kernels.reference.pool.pool_geometry)."""
    bsz, c, h, w = x.shape
    kh, kw, sh, sw, ph, pw, dh, dw, oh, ow = g[:10]
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


backends.register("max_pool2d_int8", "triton", max_pool2d_int8)

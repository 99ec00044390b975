"""Static int8 quantization of a float32 tensor in one pass, for synq.deploy on a GPU:

    q = clamp(round_half_even(x / scale) + zero, lo, hi) as int8

with a one-element float32 scale and an integer zero point (one-element tensors on x's
device, read by the kernel: no host copy, so CUDA graphs can capture it). The output has x's
memory format (x must be dense: contiguous in some dimension order), and the kernel walks x's
storage in order, so reads and writes are contiguous whatever the layout.

The same steps as PyTorch ops (torch.div, round_, add_, clamp_, .to(torch.int8)) made four
passes over the float32 tensor plus the cast: about 1.4 GB of traffic for ResNet-18's input
at batch 256 (256 x 3 x 224 x 224), against 0.19 GB here. Values are the ops' exactly:
x / scale is the IEEE quotient (on a GPU a reciprocal and two fused multiply-adds, exact by
Markstein's theorem as in conv_tap.py's epilogue; under the interpreter tl.math.div_rn), and
round-half-even plus the zero point is one add pair. A NaN in x becomes lo (PyTorch's cast
of NaN to int8 is undefined)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import synq_kernels.triton as _st

BLOCK = 2048


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, s_ptr, z_ptr, n, lo, hi, HW_FMA: tl.constexpr,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    s = tl.load(s_ptr)
    if HW_FMA:  # see conv_tap.py's epilogue
        inv = tl.math.div_rn(1.0, s)
        q = x * inv
        e = tl.math.fma(-q, s, x)
        q = tl.math.fma(e, inv, q)
    else:  # the interpreter's fma rounds twice; NumPy's division is IEEE
        q = tl.math.div_rn(x, tl.broadcast_to(s, [BLOCK]))
    # round half to even (exact for |q| < 2^22; larger |q| clamp to the same ends) and the
    # integer zero point: (q + 1.5 * 2^23) - (1.5 * 2^23 - zero)
    q = (q + 12582912.0) - (12582912.0 - tl.load(z_ptr).to(tl.float32))
    q = tl.minimum(tl.maximum(q, lo), hi)
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
    return (x.dtype == torch.float32 and x.numel() > 0 and _dense(x)
            and isinstance(scale, torch.Tensor) and isinstance(zero, torch.Tensor)
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

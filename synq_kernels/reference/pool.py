"""2-D max pooling of int8 tensors in plain PyTorch ops, and the pooling geometry every
backend of `max_pool2d_int8` shares (PyTorch's rules: output size, padding at most half the
kernel, ceil_mode's last window starting inside the input or its left padding)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .int_gemm import conv_memory_format


class PoolGeometry(NamedTuple):
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    oh: int
    ow: int
    ceil_mode: bool


def _pair(name: str, v) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(e, int) and not isinstance(e, bool) for e in v)):
        raise TypeError(f"max_pool2d_int8: {name} must be an int or a pair of ints, got {v!r}")
    return int(v[0]), int(v[1])


def _out_size(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """PyTorch's pooling output size (pooling_output_shape): with ceil_mode the last window
    must start inside the input or its left padding."""
    out = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= n + p:
        out -= 1
    return out


def pool_geometry(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                  ceil_mode: bool = False) -> PoolGeometry:
    """Checks x (int8, 4-D) and the arguments as F.max_pool2d takes them (stride None or
    empty: the kernel size) and returns the resolved geometry with the output size."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int8 or x.dim() != 4:
        got = (f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
               else type(x).__name__)
        raise ValueError(f"max_pool2d_int8 takes an int8 (B, C, H, W) tensor, got {got}")
    (kh, kw), (ph, pw), (dh, dw) = (_pair("kernel_size", kernel_size),
                                    _pair("padding", padding), _pair("dilation", dilation))
    sh, sw = _pair("stride", stride) if stride not in (None, (), []) else (kh, kw)
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError("max_pool2d_int8: kernel size, stride and dilation must be positive, "
                         "padding non-negative")
    if ph > kh // 2 or pw > kw // 2:   # as PyTorch checks it
        raise ValueError(f"max_pool2d_int8: padding {(ph, pw)} is more than half the kernel "
                         f"size ({kh}x{kw})")
    h, w = x.shape[2:]
    oh = _out_size(h, kh, sh, ph, dh, ceil_mode)
    ow = _out_size(w, kw, sw, pw, dw, ceil_mode)
    if oh < 1 or ow < 1:
        raise ValueError(f"max_pool2d_int8: output size {oh}x{ow} for an input of {h}x{w}")
    return PoolGeometry(kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, bool(ceil_mode))


def max_pool2d_int8(x: torch.Tensor, g: PoolGeometry) -> torch.Tensor:
    """F.max_pool2d of int8 x through float (exact: float16 holds every int8 value), in x's
    memory format (channels-last or contiguous)."""
    xf = x.half() if x.is_cuda else x.float()
    y = F.max_pool2d(xf, (g.kh, g.kw), (g.sh, g.sw), (g.ph, g.pw), (g.dh, g.dw),
                     ceil_mode=g.ceil_mode)
    return y.to(torch.int8).contiguous(memory_format=conv_memory_format(x))


"""Per-channel batch statistics in Triton: the "triton" backend of
`synq_kernels.channel_stats`.

Forward: one program per (sample, channel) row of H*W contiguous values (NCHW; other layouts
are made contiguous first) computes the row's mean, then the sum of squared deviations from
it in a second sweep (the row is in L2 by then), both in float32. The rows are merged per
channel in float64 on the (B, C) results: mean = mean of the row means, M2 = sum of the row
M2s + H*W * sum of (row mean - mean)^2 (all rows hold H*W values), var = M2 / (B*H*W).
Backward: dx = a[c] * (x - mean[c]) + b[c] with a = 2 g_var / N, b = g_mean / N, one read of
x and one write of dx, programs over (row, block of the row).

Not the default on a GPU (backends.set_preference below): PyTorch's var_mean is one fast
reduction there, and timed against it on an H100 and an H200 this kernel lost every row
(0.09-0.43x forward, 0.53-0.71x forward+backward, at a floor of about 0.12 ms a call:
benchmarks/results/gpu_2026-11-27/channel_stats_*); pass backend="triton" to use it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backends

BLOCK = 1024


@triton.jit
def _row_stats_kernel(x_ptr, mean_ptr, m2_ptr, HW, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * HW
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, HW, BLOCK):
        idx = start + offs
        acc += tl.load(base + idx, mask=idx < HW, other=0.0).to(tl.float32)
    rm = tl.sum(acc, axis=0) / HW
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, HW, BLOCK):
        idx = start + offs
        ok = idx < HW
        v = tl.load(base + idx, mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, v - rm, 0.0)
        acc2 += d * d
    tl.store(mean_ptr + row, rm)
    tl.store(m2_ptr + row, tl.sum(acc2, axis=0))


@triton.jit
def _backward_kernel(x_ptr, dx_ptr, a_ptr, b_ptr, mean_ptr, C, HW, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = row % C
    a = tl.load(a_ptr + c)
    b = tl.load(b_ptr + c)
    mu = tl.load(mean_ptr + c)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < HW
    v = tl.load(x_ptr + row * HW + idx, mask=ok, other=0.0).to(tl.float32)
    tl.store(dx_ptr + row * HW + idx, a * (v - mu) + b, mask=ok)


def _block(hw: int) -> int:
    return max(16, min(BLOCK, triton.next_power_of_2(hw)))


def channel_stats_forward(x: torch.Tensor):
    x = x.contiguous()
    b, c, h, w = x.shape
    hw = h * w
    if b * hw == 0 or c == 0:
        nan = torch.full((c,), float("nan"), device=x.device)
        return nan, nan.clone()
    row_mean = torch.empty((b, c), device=x.device, dtype=torch.float32)
    row_m2 = torch.empty_like(row_mean)
    _row_stats_kernel[(b * c,)](x, row_mean, row_m2, hw, BLOCK=_block(hw))
    rm = row_mean.double()
    mean = rm.mean(0)
    m2 = row_m2.double().sum(0) + hw * (rm - mean).square().sum(0)
    return mean.float(), (m2 / (b * hw)).float()


def channel_stats_backward(g_mean, g_var, x, mean):
    x = x.contiguous()
    b, c, h, w = x.shape
    hw = h * w
    dx = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        return dx.to(x.dtype)
    n = b * hw
    a = (2.0 * g_var.double() / n).float().contiguous()
    bias = (g_mean.double() / n).float().contiguous()
    blk = _block(hw)
    _backward_kernel[(b * c, triton.cdiv(hw, blk))](x, dx, a, bias, mean.contiguous(), c, hw,
                                                     BLOCK=blk)
    return dx.to(x.dtype)


backends.register("channel_stats", "triton", (channel_stats_forward, channel_stats_backward))
backends.set_preference("channel_stats", "cuda", ("reference", "triton"))

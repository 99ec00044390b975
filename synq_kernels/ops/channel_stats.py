"""Per-channel batch statistics with a fused backward: the mean and biased variance that
BatchNorm computes for each channel of a (B, C, H, W) tensor, which BN-statistics synthesis
(synq.synth) matches at every BN layer of the model in every step.

Two custom ops, `synq::channel_stats` and `synq::channel_stats_backward`, each taking the name
of the backend that runs it; autograd and the fake kernels are registered here once. Backends:
"reference" (torch.var_mean, any device), "cpu" (C++: one read of the data forward, one pass
backward; torch.var_mean and its autograd take several on the CPU) and "triton" (the same
passes on a GPU; not the default there: timed on an H100 and an H200, torch.var_mean won
every row, benchmarks/results/gpu_2026-11-27/).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, backends
from ..reference.int_gemm import conv_memory_format  # dx keeps a channels-last x's layout

OP = "channel_stats"


@torch.library.custom_op("synq::channel_stats", mutates_args=())
def _channel_stats(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    fwd, _ = backends.implementation(OP, backend)
    mean, var = fwd(x)
    return mean.contiguous(), var.contiguous()


@_channel_stats.register_fake
def _(x, backend):
    c = x.shape[1]
    return x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


@torch.library.custom_op("synq::channel_stats_backward", mutates_args=())
def _channel_stats_backward(g_mean: Tensor, g_var: Tensor, x: Tensor, mean: Tensor,
                            backend: str) -> Tensor:
    _, bwd = backends.implementation(OP, backend)
    return bwd(g_mean, g_var, x, mean).contiguous(memory_format=conv_memory_format(x))


@_channel_stats_backward.register_fake
def _(g_mean, g_var, x, mean, backend):
    return torch.empty_like(x, memory_format=conv_memory_format(x))


def _setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.save_for_backward(x, output[0])
    ctx.backend = backend


def _backward(ctx, g_mean, g_var):
    x, mean = ctx.saved_tensors
    if g_mean is None:
        g_mean = torch.zeros_like(mean)
    if g_var is None:
        g_var = torch.zeros_like(mean)
    dx = torch.ops.synq.channel_stats_backward(g_mean.float(), g_var.float(), x, mean,
                                               ctx.backend)
    return dx, None


_channel_stats.register_autograd(_backward, setup_context=_setup_context)


def channel_stats(x: Tensor, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(mean, var): the per-channel mean and biased variance of x over (B, H, W), as
    BatchNorm2d computes them in training mode.

    Args:
        x: (B, C, H, W) float32, float16 or bfloat16, any strides; computed in float32.
        backend: "reference", "cpu", "triton", or None for the default of x's device (cpu
            on a CPU, reference on a GPU).

    Returns two float32 tensors of shape (C,) (NaN where B * H * W is 0). Differentiable
    with respect to x (first derivatives).
    """
    _checks.check_float_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    be = backends.resolve(OP, x.device, backend)
    return torch.ops.synq.channel_stats(x, be)

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
from .int_gemm import _direct_ok

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


# ---------------------------------------------------------------------------------------------
# eval-mode BatchNorm fused with the statistics of its input

BN_OP = "batch_norm_stats"


@torch.library.custom_op("synq::batch_norm_stats", mutates_args=())
def _batch_norm_stats(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,
                      running_var: Tensor, eps: float, act: int, backend: str
                      ) -> tuple[Tensor, Tensor, Tensor]:
    return _bn_forward_body(x, weight, bias, running_mean, running_var, eps, act, backend)


def _bn_forward_body(x, weight, bias, running_mean, running_var, eps, act, backend):
    fwd, _ = backends.implementation(BN_OP, backend)
    y, mean, var = fwd(x, weight, bias, running_mean, running_var, eps, act)
    return (y.contiguous(memory_format=conv_memory_format(x)), mean.contiguous(),
            var.contiguous())


@_batch_norm_stats.register_fake
def _(x, weight, bias, running_mean, running_var, eps, act, backend):
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=conv_memory_format(x)),
            x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32))


@torch.library.custom_op("synq::batch_norm_stats_backward", mutates_args=())
def _batch_norm_stats_backward(g_y: Tensor, g_mean: Tensor, g_var: Tensor, x: Tensor, y: Tensor,
                               mean: Tensor, weight: Tensor, running_var: Tensor, eps: float,
                               act: int, backend: str) -> Tensor:
    return _bn_backward_body(g_y, g_mean, g_var, x, y, mean, weight, running_var, eps, act,
                             backend)


def _bn_backward_body(g_y, g_mean, g_var, x, y, mean, weight, running_var, eps, act, backend):
    _, bwd = backends.implementation(BN_OP, backend)
    dx = bwd(g_y, g_mean, g_var, x, y, mean, weight, running_var, eps, act)
    return dx.contiguous(memory_format=conv_memory_format(x))


@_batch_norm_stats_backward.register_fake
def _(g_y, g_mean, g_var, x, y, mean, weight, running_var, eps, act, backend):
    return torch.empty_like(x, memory_format=conv_memory_format(x))


def _bn_setup_context(ctx, inputs, output):
    x, weight, _, _, running_var, eps, act, backend = inputs
    # y is read by the backward only for the activation's mask
    ctx.save_for_backward(x, output[0] if act else x, output[1], weight, running_var)
    ctx.eps, ctx.act, ctx.backend = eps, act, backend


def _bn_backward(ctx, g_y, g_mean, g_var, body=None):
    x, y, mean, weight, running_var = ctx.saved_tensors
    g_y = torch.zeros_like(x) if g_y is None else g_y.to(x.dtype)
    g_mean = torch.zeros_like(mean) if g_mean is None else g_mean.float()
    g_var = torch.zeros_like(mean) if g_var is None else g_var.float()
    dx = (body or torch.ops.synq.batch_norm_stats_backward)(
        g_y, g_mean, g_var, x, y, mean, weight, running_var, ctx.eps, ctx.act, ctx.backend)
    return dx, None, None, None, None, None, None, None


_batch_norm_stats.register_autograd(_bn_backward, setup_context=_bn_setup_context)


class _DirectBN(torch.autograd.Function):
    """The op for an eager call: the same forward, backward and gradients without the
    custom-op layer (about 0.4 ms of host time a call, forward and backward, in synthesis)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, act, backend):
        args = (x, weight, bias, running_mean, running_var, eps, act, backend)
        out = _bn_forward_body(*args)
        _bn_setup_context(ctx, args, out)
        return out

    @staticmethod
    def backward(ctx, g_y, g_mean, g_var):
        return _bn_backward(ctx, g_y, g_mean, g_var, body=_bn_backward_body)


def batch_norm_stats(x: Tensor, running_mean: Tensor, running_var: Tensor,
                     weight: Tensor | None = None, bias: Tensor | None = None,
                     eps: float = 1e-5, activation: str | None = None,
                     backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var): y = BatchNorm2d of x in eval mode (F.batch_norm with the running
    statistics, training=False), followed by `activation` ("relu": torch.relu, "relu6":
    F.relu6, or None), and the channel mean and biased variance of x itself, as
    `channel_stats(x)` gives them. BN-statistics synthesis
    needs both at every BN layer; the cpu backend computes them in one read of x, and their
    backward in one pass (against BatchNorm, the activation, the statistics, their backwards and
    the sum of two gradients).

    On the cpu backend every value has the bits of the separate calls (F.batch_norm, the
    activation and channel_stats, forward and backward); the reference runs those calls.

    Args:
        x: (B, C, H, W) float32, float16 or bfloat16, any strides; y has x's dtype, the
            statistics are float32 (the cpu backend computes in float32).
        running_mean, running_var: (C,) the statistics BatchNorm normalizes with.
        weight, bias: (C,) or None (then 1 and 0).
        backend: "reference", "cpu", or None (cpu on a CPU, reference elsewhere).

    Differentiable with respect to x only: weight, bias and the running statistics must not
    require grad (a frozen model, as in synthesis).
    """
    _checks.check_float_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if weight is None:
        weight = torch.ones(c, device=x.device)
    if bias is None:
        bias = torch.zeros(c, device=x.device)
    params = {"running_mean": running_mean, "running_var": running_var, "weight": weight,
              "bias": bias}
    for name, t in params.items():
        _checks.check_float_tensor(name, t)
        if t.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},) for x of {c} channels, got "
                             f"{tuple(t.shape)}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"batch_norm_stats is differentiable with respect to x only, but "
                             f"{name} requires grad; freeze it (requires_grad_(False)) or use "
                             f"F.batch_norm and channel_stats")
    _checks.check_same_device(x=x, **params)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    act = _checks.activation_index(activation)
    be = backends.resolve(BN_OP, x.device, backend)
    args = (x, *(params[k].detach().float() for k in ("weight", "bias", "running_mean",
                                                       "running_var")), float(eps),
            act, be)
    if _direct_ok(*args[:5]):  # eager: the op's autograd without its layer
        return _DirectBN.apply(*args)
    return torch.ops.synq.batch_norm_stats(*args)

"""Fused fake quantization with a straight-through estimator (LSQ+ gradients).

Two custom ops, `synq::fake_quant` and `synq::fake_quant_backward`, each taking the name of
the backend that runs it; autograd and the fake (meta) kernels are registered here once for
all backends. The backends register their implementations in `synq_kernels.backends`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, backends
from ..reference.int_gemm import conv_memory_format
from .int_gemm import _direct_ok

OP = "fake_quant"


# A channels-last 4-D x (a model in channels-last memory format) reaches the backends as its
# contiguous NHWC view, x.permute(0, 2, 3, 1), with the axis renumbered; the result is
# permuted back, so it is channels-last too and nothing is copied.
_NHWC_AXIS = {-1: -1, 0: 0, 1: 3, 2: 1, 3: 2}


def _channels_last(x: Tensor) -> bool:
    return conv_memory_format(x) == torch.channels_last


def _forward_body(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                  axis: int, grad_factor: float, act: int, backend: str) -> Tensor:
    _checks.check_positive_finite("scale", scale)
    fwd, _ = backends.implementation(OP, backend)
    if _channels_last(x):
        y = fwd(x.permute(0, 2, 3, 1), scale, zero_point, qmin, qmax, _NHWC_AXIS[axis], act)
        return y.permute(0, 3, 1, 2)
    return fwd(x, scale, zero_point, qmin, qmax, axis, act)


_fake_quant = torch.library.custom_op("synq::fake_quant", mutates_args=())(_forward_body)


@_fake_quant.register_fake
def _(x, scale, zero_point, qmin, qmax, axis, grad_factor, act, backend):
    return torch.empty_like(x, memory_format=conv_memory_format(x))


def _backward_body(dy: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int,
                   qmax: int, axis: int, grad_factor: float, qparam_grads: bool, act: int,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _, bwd = backends.implementation(OP, backend)
    if _channels_last(x):
        dy = dy.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        dx, ds, dz = bwd(dy, x.permute(0, 2, 3, 1), scale, zero_point, qmin, qmax,
                         _NHWC_AXIS[axis], grad_factor, qparam_grads, act)
        return dx.permute(0, 3, 1, 2), ds, dz
    return bwd(dy, x, scale, zero_point, qmin, qmax, axis, grad_factor, qparam_grads, act)


_fake_quant_backward = torch.library.custom_op("synq::fake_quant_backward",
                                               mutates_args=())(_backward_body)


@_fake_quant_backward.register_fake
def _(dy, x, scale, zero_point, qmin, qmax, axis, grad_factor, qparam_grads, act, backend):
    return (torch.empty_like(x, memory_format=conv_memory_format(x)),
            torch.empty_like(scale, dtype=torch.float32),
            torch.empty_like(zero_point, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, scale, zero_point, qmin, qmax, axis, grad_factor, act, backend = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = (qmin, qmax, axis, grad_factor, act, backend)


def _backward(ctx, dy, body=None):
    x, scale, zero_point = ctx.saved_tensors
    qmin, qmax, axis, grad_factor, act, backend = ctx.args
    need_s, need_z = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx, ds, dz = (body or torch.ops.synq.fake_quant_backward)(
        dy, x, scale, zero_point, qmin, qmax, axis, grad_factor, need_s or need_z, act, backend)
    return (dx if ctx.needs_input_grad[0] else None,
            ds.to(scale.dtype) if need_s else None,
            dz.to(zero_point.dtype) if need_z else None,
            None, None, None, None, None, None)


_fake_quant.register_autograd(_backward, setup_context=_setup_context)


class _Direct(torch.autograd.Function):
    """The op for an eager call (see fake_quant): the same forward, backward and gradients,
    without the custom-op layer, which cost most of a small call's host time (CPU, 4 x 16 x 8
    x 8 forward and backward: 418 us through the custom op)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_factor, act, backend):
        _setup_context(ctx, (x, scale, zero_point, qmin, qmax, axis, grad_factor, act,
                             backend), None)
        return _forward_body(x, scale, zero_point, qmin, qmax, axis, grad_factor, act, backend)

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy, body=_backward_body)


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a `bits`-bit integer grid."""
    _checks.check_int_range("bits", bits, 2, 8)
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _as_param(name: str, p, x: Tensor) -> Tensor:
    if not isinstance(p, torch.Tensor):
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"{name} must be a tensor or a number, got {type(p).__name__}")
        # filled on the device: torch.tensor would copy from host memory and, on a GPU, wait
        # for its queue at every call
        return torch.full((), float(p), dtype=torch.float32, device=x.device)
    if not p.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32), got dtype {p.dtype}")
    return p


def fake_quant(x: Tensor, scale, zero_point, bits: int, signed: bool = False, axis=None,
               grad_factor: float = 1.0, activation: str | None = None,
               backend: str | None = None) -> Tensor:
    """Fake-quantize `x` to a `bits`-bit grid and back, in one fused kernel.

    y = (clamp(round(x / scale) + z, qmin, qmax) - z) * scale with
    z = clamp(round(zero_point), qmin, qmax), rounding half to even, and
    (qmin, qmax) = (-2^(bits-1), 2^(bits-1) - 1) if `signed` else (0, 2^bits - 1).
    With `activation` ("relu" or "relu6") x is first passed through torch.relu / F.relu6 in
    the same kernel: the same values and gradients as fake_quant(torch.relu(x), ...), in one
    pass over memory each way instead of two.

    Args:
        x: float32, float16 or bfloat16 tensor (computed in float32, returned in x's dtype).
        scale, zero_point: float32 tensors of one element (`axis=None`, per-tensor) or of
            x.shape[axis] elements (per-channel along dim `axis`, negative allowed).
        bits: 2 to 8.
        grad_factor: multiplies the scale and zero-point gradients (LSQ's gradient scale).
        activation: None, "relu" or "relu6", applied to x before the quantization.
        backend: "reference", "cpu", "cuda", "triton", or None for the fastest available on
            x's device (the SYNQ_BACKEND environment variable may set the default).

    Gradients (straight-through estimator, LSQ+): dx = dy where x is inside the clamp range
    and 0 elsewhere; d scale = dy * (round(x/s) - x/s) inside, dy * (q_clamped - z) outside;
    d zero_point = 0 inside, -dy * scale outside; both reduced to scale's shape. With an
    activation, x in these formulas is its output and dx is then masked by its gradient.
    """
    qmin, qmax = quant_range(bits, signed)
    _checks.check_float_tensor("x", x)
    scale = _as_param("scale", scale, x)
    zero_point = _as_param("zero_point", zero_point, x)
    _checks.check_same_device(x=x, scale=scale, zero_point=zero_point)
    ax = _checks.normalize_axis(axis, x.dim())
    want = 1 if ax < 0 else x.shape[ax]
    for name, p in (("scale", scale), ("zero_point", zero_point)):
        if p.numel() != want:
            where = "per-tensor (axis=None)" if ax < 0 else f"x.shape[{axis}]"
            raise ValueError(f"{name} must hold {want} element(s) for {where}, "
                             f"got shape {tuple(p.shape)}")
    grad_factor = _checks.check_finite_float("grad_factor", grad_factor)
    act = _checks.activation_index(activation)
    be = backends.resolve(OP, x.device, backend)
    if _direct_ok(x, scale, zero_point):  # eager: the op's autograd without its layer
        return _Direct.apply(x, scale, zero_point, qmin, qmax, ax, grad_factor, act, be)
    return torch.ops.synq.fake_quant(x, scale, zero_point, qmin, qmax, ax, grad_factor, act,
                                     be)

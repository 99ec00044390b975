"""The "cpu" and "cuda" backends: thin calls into the kernels of `synq_kernels._C`.

The compiled ops have one schema (csrc/ops.cpp) and per-dispatch-key implementations
(csrc/cpu/, csrc/cuda/), so the same call serves both backends; the backend check happens in
`synq_kernels.backends.resolve`."""
from __future__ import annotations

import torch

from . import backends
from .ops.lowpass import gaussian_matrix, lowpass_fft, use_separable


def fake_quant_forward(x, scale, zero_point, qmin, qmax, axis, act=0):
    return torch.ops.synq._fake_quant_fwd(x, scale, zero_point, qmin, qmax, axis, act)


def fake_quant_backward(dy, x, scale, zero_point, qmin, qmax, axis, grad_factor, qparam_grads,
                        act=0):
    return torch.ops.synq._fake_quant_bwd(dy, x, scale, zero_point, qmin, qmax, axis,
                                          grad_factor, qparam_grads, act)


for _backend in ("cpu", "cuda"):
    backends.register("fake_quant", _backend, (fake_quant_forward, fake_quant_backward))


def lowpass_filter(x, d0, mask):
    if not use_separable(x, mask):
        return lowpass_fft(x, d0, mask)
    h, w = x.shape[-2:]
    # float64 for the CPU kernel (it splits them by parity before rounding), float32 on GPUs.
    dt = torch.float64 if x.device.type == "cpu" else torch.float32
    return torch.ops.synq._lowpass_gaussian(x, gaussian_matrix(h, d0, x.device, dt),
                                            gaussian_matrix(w, d0, x.device, dt))


for _backend in ("cpu", "cuda"):
    backends.register("lowpass", _backend, lowpass_filter)


def channel_stats_forward(x):
    return torch.ops.synq._channel_stats(x.float())


def channel_stats_backward(g_mean, g_var, x, mean):
    return torch.ops.synq._channel_stats_backward(g_mean, g_var, x.float(), mean).to(x.dtype)


# CPU only: on a GPU the reference's torch.var_mean is the fast path
backends.register("channel_stats", "cpu", (channel_stats_forward, channel_stats_backward))


def batch_norm_stats_forward(x, weight, bias, running_mean, running_var, eps, act):
    y, mean, var = torch.ops.synq._batch_norm_stats(x.float(), weight, bias, running_mean,
                                                    running_var, eps, act)
    return y.to(x.dtype), mean, var


def batch_norm_stats_backward(g_y, g_mean, g_var, x, y, mean, weight, running_var, eps, act):
    return torch.ops.synq._batch_norm_stats_backward(g_y.float(), g_mean, g_var, x.float(),
                                                     y.float(), mean, weight, running_var, eps,
                                                     act).to(x.dtype)


backends.register("batch_norm_stats", "cpu",
                  (batch_norm_stats_forward, batch_norm_stats_backward))


def int_mm(a, b, k, a_packed, a_signed, b_packed):
    return torch.ops.synq._int_mm(a, b, k, a_packed, a_signed, b_packed)


def quantized_linear(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, relu, out_dtype,
                     w_packed):
    return torch.ops.synq._quantized_linear(x, x_scale, x_zero, w, w_scale, w_rowsum, bias,
                                            relu, out_dtype, w_packed)


def quantized_conv2d(x, x_scale, x_zero, w, w_scale, w_rowsum, bias, stride, padding,
                     dilation, groups, relu, out_dtype):
    return torch.ops.synq._quantized_conv2d(x, x_scale, x_zero, w, w_scale, w_rowsum, bias,
                                            stride, padding, dilation, groups, relu, out_dtype)


# The same compiled ops serve both backends (csrc/cpu/int_gemm.cpp, csrc/cuda/int_gemm.cu);
# "cuda" counts as available only when _C was built with its CUDA kernels
# (backends.unavailable_reason).
for _backend in ("cpu", "cuda"):
    backends.register("int_mm", _backend, int_mm)
    backends.register("quantized_linear", _backend, quantized_linear)
    backends.register("quantized_conv2d", _backend, quantized_conv2d)

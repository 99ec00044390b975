"""Per-channel batch statistics (the reference): mean and biased variance of a (B, C, H, W)
tensor over (B, H, W), and the gradient of a loss with respect to the tensor given the
gradients with respect to them."""
from __future__ import annotations

import torch
from torch import Tensor


def channel_stats_forward(x: Tensor) -> tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
    return mean, var


def channel_stats_backward(g_mean: Tensor, g_var: Tensor, x: Tensor, mean: Tensor) -> Tensor:
    """d/dx of <g_mean, mean> + <g_var, var>: g_mean[c] / N + g_var[c] * 2 (x - mean[c]) / N,
    N = B * H * W."""
    n = x.shape[0] * x.shape[2] * x.shape[3]
    view = (1, -1, 1, 1)
    dx = ((x.float() - mean.reshape(view)) * (2.0 * g_var / n).reshape(view)
          + (g_mean / n).reshape(view))
    return dx.to(x.dtype)


def batch_norm_stats_forward(x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor,
                             running_var: Tensor, eps: float, act: int = 0
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var): eval-mode BatchNorm of x with the running statistics, then the
    activation act (0 none, 1 torch.relu, 2 F.relu6), and x's own channel mean and biased
    variance (channel_stats_forward)."""
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0,
                                       eps)
    if act == 1:
        y = torch.relu(y)
    elif act == 2:
        y = torch.nn.functional.relu6(y)
    mean, var = channel_stats_forward(x)
    return y, mean, var


def batch_norm_stats_backward(g_y: Tensor, g_mean: Tensor, g_var: Tensor, x: Tensor, y: Tensor,
                              mean: Tensor, weight: Tensor, running_var: Tensor, eps: float,
                              act: int = 0) -> Tensor:
    """dx = g * weight[c] / sqrt(running_var[c] + eps) plus the statistics' dx
    (channel_stats_backward); g = g_y masked by the activation's gradient, read from its
    output y: ReLU's where y > 0 (NaN passes), ReLU6's where 0 < y < 6."""
    view = (1, -1, 1, 1)
    if act == 1:
        g_y = torch.ops.aten.threshold_backward(g_y, y, 0)
    elif act == 2:
        g_y = torch.where((y > 0) & (y < 6), g_y, 0.0)
    invstd = (1.0 / torch.sqrt(running_var.double() + eps)).float()
    dx = g_y.float() * invstd.reshape(view) * weight.float().reshape(view)
    return (dx + channel_stats_backward(g_mean, g_var, x, mean).float()).to(x.dtype)

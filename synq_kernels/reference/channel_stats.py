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

"""Reference fake quantization in plain PyTorch (computes in float32).

Forward:  z = clamp(round(zero_point), qmin, qmax)
          y = (clamp(round(x / scale) + z, qmin, qmax) - z) * scale      (round half to even)
Backward (LSQ+): an element is in range when qmin <= round(x / scale) + z <= qmax;
          dx     = dy in range, 0 when clamped
          dscale = dy * (round(x/s) - x/s) in range, dy * (q_clamped - z) when clamped
          dzero  = 0 in range, -dy * scale when clamped
          the last two times grad_factor, summed to the shape of scale.
`axis = -1` means per-tensor; otherwise scale and zero_point index dim `axis` of x.
`act` (0 none, 1 ReLU, 2 ReLU6) applies torch.relu / F.relu6 to x first: y = fq(act(x)), and
dx is fq's dx passed through the activation's backward as torch computes it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

def activate(x: torch.Tensor, act: int) -> torch.Tensor:
    if act == 0:
        return x
    if act == 1:
        return torch.relu(x)
    if act == 2:
        return F.relu6(x)
    raise ValueError(f"act must be 0 (none), 1 (ReLU) or 2 (ReLU6), got {act!r}")


def activation_backward(g: torch.Tensor, r: torch.Tensor, act: int) -> torch.Tensor:
    """g passed back through the activation whose output is r: relu's threshold_backward,
    relu6's gradient (only strictly inside (0, 6))."""
    if act == 0:
        return g
    if act == 1:
        return torch.ops.aten.threshold_backward(g, r, 0)
    return torch.where((r > 0) & (r < 6), g, torch.zeros((), dtype=g.dtype, device=g.device))


def _broadcast(p: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    if axis < 0:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def _reduce(t: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    if axis < 0:
        return t.sum().reshape(like.shape)
    dims = [d for d in range(t.dim()) if d != axis]
    return (t.sum(dims) if dims else t).reshape(like.shape)


def _parts(x, scale, zero_point, qmin, qmax, axis, dtype):
    xf = x.to(dtype)
    s = _broadcast(scale.to(dtype), xf, axis)
    z = torch.clamp(torch.round(_broadcast(zero_point.to(dtype), xf, axis)), qmin, qmax)
    t = xf / s
    r = torch.round(t)
    q = r + z
    return xf, s, z, t, r, q


def fake_quant_forward(x, scale, zero_point, qmin: int, qmax: int, axis: int, act: int = 0,
                       compute_dtype=torch.float32):
    x = activate(x, act)
    _, s, z, _, _, q = _parts(x, scale, zero_point, qmin, qmax, axis, compute_dtype)
    return ((torch.clamp(q, qmin, qmax) - z) * s).to(x.dtype)


def fake_quant_backward(dy, x, scale, zero_point, qmin: int, qmax: int, axis: int,
                        grad_factor: float, qparam_grads: bool, act: int = 0,
                        compute_dtype=torch.float32):
    x = activate(x, act)
    _, s, z, t, r, q = _parts(x, scale, zero_point, qmin, qmax, axis, compute_dtype)
    g = dy.to(compute_dtype)
    inside = (q >= qmin) & (q <= qmax)
    dx = activation_backward(torch.where(inside, g, torch.zeros_like(g)).to(x.dtype), x, act)
    if not qparam_grads:
        return dx, torch.zeros_like(scale, dtype=torch.float32), \
            torch.zeros_like(zero_point, dtype=torch.float32)
    qc = torch.clamp(q, qmin, qmax)
    ds = g * torch.where(inside, r - t, qc - z)
    dz = torch.where(inside, torch.zeros_like(g), -g * s)
    ds = _reduce(ds, scale, axis) * grad_factor
    dz = _reduce(dz, zero_point, axis) * grad_factor
    return dx, ds.to(torch.float32), dz.to(torch.float32)


def fake_quant_ste(x, scale, zero_point, qmin: int, qmax: int, axis: int,
                   grad_factor: float = 1.0):
    """The same function written with straight-through estimators, so that plain autograd
    yields the LSQ+ gradients. Tests check every backend's backward against it."""
    xf = x.to(torch.float32)
    s_in = scale * grad_factor + (scale - scale * grad_factor).detach()
    z_in = zero_point * grad_factor + (zero_point - zero_point * grad_factor).detach()
    s = _broadcast(s_in, xf, axis)
    zr = _broadcast(z_in, xf, axis)
    z = zr + (torch.clamp(torch.round(zr), qmin, qmax) - zr).detach()
    t = xf / s
    r = t + (torch.round(t) - t).detach()
    # The clamp decision is taken on the exact integers, so that rounding in the STE sums
    # cannot move an element across the range boundary.
    with torch.no_grad():
        q = torch.round(t) + z
        inside = (q >= qmin) & (q <= qmax)
        qc = torch.clamp(q, qmin, qmax)
    y = torch.where(inside, (r + z - z) * s, (qc - z) * s)
    exact = fake_quant_forward(x, scale, zero_point, qmin, qmax, axis).to(torch.float32)
    return (y + (exact - y).detach()).to(x.dtype)

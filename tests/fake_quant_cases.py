"""Shared helpers of the fake_quant tests: input generation and the comparison rule."""
import torch

from synq_kernels.reference import fake_quant as RF


def make_inputs(shape, axis, dtype, bits, signed, device="cpu", seed=0):
    """Fresh random x, scale, zero_point, dy; scales spread so that some elements clamp."""
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    c = 1 if axis is None else shape[axis]
    x = torch.randn(shape, generator=g) * 2
    scale = torch.rand(c, generator=g) * 3.0 / (qmax - qmin) + 0.2 / (qmax - qmin)
    zp = torch.randint(qmin, qmax + 1, (c,), generator=g).float() + \
        (torch.rand(c, generator=g) - 0.5) * 0.8
    dy = torch.randn(shape, generator=g)
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    return (x.to(device, dtype), scale.to(device), zp.to(device), dy.to(device, dtype),
            qmin, qmax)


def qparam_grad_tolerance(dy, x, scale, zp, qmin, qmax, axis, grad_factor):
    """Tolerances for d scale and d zero_point, per channel.

    Every backend computes the per-element terms identically (IEEE float32 division and
    rounding); only the order of the sum differs. So the error is bounded by a small multiple
    of eps * sum|terms|; 1e-5 * sum|terms| is far above that bound yet below one element's
    share (a dropped or doubled element fails)."""
    ax = -1 if axis is None else axis % x.dim()
    xf = x.float()
    s = RF._broadcast(scale.float(), xf, ax)
    z = torch.clamp(torch.round(RF._broadcast(zp.float(), xf, ax)), qmin, qmax)
    t = xf / s
    r = torch.round(t)
    q = r + z
    inside = (q >= qmin) & (q <= qmax)
    g = dy.float().abs()
    ts = (g * torch.where(inside, (r - t).abs(), (torch.clamp(q, qmin, qmax) - z).abs()))
    tz = g * torch.where(inside, torch.zeros_like(g), s.abs().expand_as(g))
    sums = [RF._reduce(v.double(), scale, ax).reshape(-1) for v in (ts, tz)]
    return [1e-5 * abs(grad_factor) * v + 1e-6 for v in sums]


def assert_grads_close(got, want, tol, name):
    got, want = got.reshape(-1).double(), want.reshape(-1).double()
    err = (got - want).abs()
    assert bool((err <= tol.to(err)).all()), \
        f"{name}: max error {float(err.max())} above tolerance {float(tol.max())}"

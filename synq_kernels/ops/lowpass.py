"""Low-pass filter of images in the frequency domain (SynQ's filter of synthetic images).

One custom op, `synq::lowpass`, taking the name of the backend that runs it; autograd and the
fake (meta) kernel are registered here once for all backends. The filter is linear and
self-adjoint, so the backward is the same op applied to the incoming gradient (and so is
differentiable again). The backends register one function `(x, d0, mask) -> y` each in
`synq_kernels.backends`.

The Gaussian filter is separable, y = A_H x A_W (see `reference.gaussian_lowpass_matrix`);
`gaussian_matrix` builds the operators once per (size, d0, device, dtype) for the fast
backends. The matrix form costs O(H + W) multiply-adds per pixel, the FFT O(log HW): past
`MAX_SEPARABLE_SIZE` (and for the ideal mask) the fast backends take `lowpass_fft`, three
passes of real FFTs instead of the reference's eight of complex ones.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _checks, backends
from ..reference.lowpass import MASKS, gaussian_lowpass_matrix, lowpass_mask

OP = "lowpass"
# Largest H or W filtered by the separable matrices; measured on a 2-core AVX2 CPU the two
# forms break even near 256 (SynQ's images are 28 to 224).
MAX_SEPARABLE_SIZE = 256


@torch.library.custom_op("synq::lowpass", mutates_args=())
def _lowpass(x: Tensor, d0: float, mask: str, backend: str) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    y = backends.implementation(OP, backend)(x, d0, mask)
    return y.contiguous()


@_lowpass.register_fake
def _(x, d0, mask, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, d0, mask, backend = inputs
    ctx.args = (d0, mask, backend)


def _backward(ctx, dy):
    d0, mask, backend = ctx.args
    return torch.ops.synq.lowpass(dy, d0, mask, backend), None, None, None


_lowpass.register_autograd(_backward, setup_context=_setup_context)


@functools.lru_cache(maxsize=64)
def gaussian_matrix(n: int, d0: float, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """A_n (n x n, symmetric circulant) of the Gaussian filter along one dim, built in float64
    and cached per (n, d0, device, dtype)."""
    return gaussian_lowpass_matrix(n, d0, dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _half_spectrum_mask(h: int, w: int, d0: float, mask: str, device: torch.device) -> Tensor:
    m = torch.fft.ifftshift(lowpass_mask(h, w, d0, mask, device=device), dim=(-2, -1))
    return m[:, : w // 2 + 1].contiguous()


def use_separable(x: Tensor, mask: str) -> bool:
    """Whether the fast backends filter x with the separable matrices (else `lowpass_fft`)."""
    return mask == "gaussian" and max(x.shape[-2:]) <= MAX_SEPARABLE_SIZE


def lowpass_fft(x: Tensor, d0: float, mask: str) -> Tensor:
    """The filter as irfft2(mask * rfft2(x)) with the mask in unshifted order. Equal to the
    reference: the mask is even in the signed frequency, so the product keeps rfft2's
    Hermitian symmetry and the inverse is real."""
    h, w = x.shape[-2:]
    spec = torch.fft.rfft2(x.to(torch.float32))
    y = torch.fft.irfft2(spec * _half_spectrum_mask(h, w, d0, mask, x.device), s=(h, w))
    return y.to(x.dtype)


def lowpass(x: Tensor, d0: float, mask: str = "gaussian", backend: str | None = None) -> Tensor:
    """Low-pass filter of the last two dims (H, W) of `x`, in one pass over the data.

    y = real(ifft2(ifftshift(M * fftshift(fft2(x))))) with, d = distance from the centre
    (H//2, W//2) of the shifted spectrum, M = exp(-d^2 / (2 d0^2)) for mask="gaussian" or
    M = 1 where d <= d0, else 0, for mask="ideal".

    Args:
        x: (..., H, W) float32, float16 or bfloat16 (computed in float32, returned in x's
            dtype and contiguous); any H, W >= 1. Empty batches are fine.
        d0: cut-off radius in frequency bins, a finite number > 0 (SynQ uses 80 for
            Gaussian masks at 224x224).
        mask: "gaussian" (separable: y = A_H x A_W, one pass) or "ideal" (FFT path).
        backend: "reference", "cpu", "cuda", "triton", or None for the fastest available on
            x's device (the SYNQ_BACKEND environment variable may set the default).

    Differentiable: the filter is linear and self-adjoint, so dx = lowpass(dy, d0, mask).
    """
    _checks.check_float_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims (..., H, W), got shape {tuple(x.shape)}")
    d0 = _checks.check_finite_float("d0", d0)
    if d0 <= 0:
        raise ValueError(f"d0 must be a finite number > 0, got {d0!r}")
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {', '.join(repr(m) for m in MASKS)}, "
                         f"got {mask!r}")
    be = backends.resolve(OP, x.device, backend)
    return torch.ops.synq.lowpass(x, d0, mask, be)

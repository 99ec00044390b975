"""Reference low-pass filter in plain PyTorch, on the torch.fft path (computes in float32).

Over the last two dims (H, W) of x:
    X = fftshift(fft2(x))
    M[i, j] = exp(-((i - H//2)^2 + (j - W//2)^2) / (2 d0^2))          mask = "gaussian"
    M[i, j] = 1 if (i - H//2)^2 + (j - W//2)^2 <= d0^2 else 0           mask = "ideal"
    y = real(ifft2(ifftshift(M * X)))
The filter is linear and self-adjoint (M is real), so its backward is the same filter
applied to the incoming gradient.

The Gaussian mask factorizes, M[i, j] = g_H(i) g_W(j), so the Gaussian filter is also
y = A_H x A_W with real symmetric circulant matrices A_N = F^-1 diag(ifftshift(g_N)) F;
`gaussian_lowpass_matrix` builds them (in float64) for the fast backends.
"""
from __future__ import annotations

import torch

MASKS = ("gaussian", "ideal")


def lowpass_mask(h: int, w: int, d0: float, mask: str, device=None,
                 dtype=torch.float32) -> torch.Tensor:
    """The (h, w) mask M of the shifted spectrum (centre at (h//2, w//2))."""
    i = torch.arange(h, device=device, dtype=torch.float64).view(-1, 1) - h // 2
    j = torch.arange(w, device=device, dtype=torch.float64).view(1, -1) - w // 2
    r2 = i * i + j * j
    if mask == "gaussian":
        m = torch.exp(-r2 / (2.0 * d0 * d0))
    elif mask == "ideal":
        m = (r2 <= d0 * d0).to(torch.float64)
    else:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {mask!r}")
    return m.to(dtype)


def lowpass_forward(x: torch.Tensor, d0: float, mask: str = "gaussian") -> torch.Tensor:
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    h, w = x.shape[-2:]
    xf = x.to(torch.float32)
    m = lowpass_mask(h, w, d0, mask, device=x.device)
    spec = torch.fft.fftshift(torch.fft.fft2(xf), dim=(-2, -1))
    y = torch.fft.ifft2(torch.fft.ifftshift(m * spec, dim=(-2, -1))).real
    return y.to(x.dtype).contiguous()


def lowpass_backward(dy: torch.Tensor, d0: float, mask: str = "gaussian") -> torch.Tensor:
    """Self-adjoint: the backward is the forward filter of dy."""
    return lowpass_forward(dy, d0, mask)


def gaussian_gain(n: int, d0: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """The 1-D Gaussian factor in unshifted (fft) order: gain[k] = g(f(k)) with f(k) = k for
    k < ceil(n/2), else k - n (what ifftshift does to exp(-(i - n//2)^2 / (2 d0^2)))."""
    k = torch.arange(n, dtype=torch.float64)
    f = torch.where(k < (n + 1) // 2, k, k - n)
    return torch.exp(-f * f / (2.0 * d0 * d0)).to(dtype=dtype, device=device)


def gaussian_lowpass_matrix(n: int, d0: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """The real symmetric circulant A (n x n) with A x = real(ifft(gain * fft(x))) along one
    dim, built in float64: A[m, k] = c[(m - k) mod n], c = ifft(gain). The gain is even in f,
    so c is real and c[j] = c[n - j] (A symmetric)."""
    c = torch.fft.ifft(gaussian_gain(n, d0).to(torch.complex128)).real
    idx = (torch.arange(n).view(-1, 1) - torch.arange(n).view(1, -1)) % n
    return c[idx].to(dtype=dtype, device=device)


def lowpass_gaussian_separable(x: torch.Tensor, d0: float) -> torch.Tensor:
    """The Gaussian filter in its separable form y = A_H x A_W (float64 matrices, float32
    products); equal to `lowpass_forward(x, d0, "gaussian")` up to rounding."""
    h, w = x.shape[-2:]
    a_h = gaussian_lowpass_matrix(h, d0, torch.float32, x.device)
    a_w = gaussian_lowpass_matrix(w, d0, torch.float32, x.device)
    return (a_h @ x.to(torch.float32) @ a_w).to(x.dtype)


__all__ = ["MASKS", "lowpass_mask", "lowpass_forward", "lowpass_backward", "gaussian_gain",
           "gaussian_lowpass_matrix", "lowpass_gaussian_separable"]

"""Low-pass filtering of image batches (METHOD.md section 3), through `synq_kernels.lowpass`.

synq never filters in Python itself: the op (Gaussian or ideal mask, differentiable, several
backends) lives in synq_kernels. This module only checks the arguments and says clearly when
the installed synq_kernels predates the op.
"""
from __future__ import annotations

import math

import torch

MASKS = ("gaussian", "ideal")
PAPER_D0, PAPER_SIZE = 80.0, 224  # SynQ's Gaussian cut-off, set for ImageNet's 224 px


def scaled_d0(shape) -> float:
    """SynQ's cut-off for images of `shape` (..., H, W): 80 at 224 px, scaled with the smaller
    side (10 at 28 px). d0 = 80 itself barely filters a 28-32 px image (the filtered batch
    differs from it by about 1.5%, against about 49% at 224 px)."""
    return PAPER_D0 * min(int(shape[-2]), int(shape[-1])) / PAPER_SIZE


def has_lowpass() -> bool:
    """Whether the installed synq_kernels provides the lowpass op."""
    import synq_kernels  # (here: the command line imports this module for scaled_d0 alone)
    return callable(getattr(synq_kernels, "lowpass", None))


def check_lowpass_args(d0, mask) -> float:
    if isinstance(d0, bool) or not isinstance(d0, (int, float)) or not math.isfinite(d0) \
            or d0 <= 0:
        raise ValueError(f"d0 (the low-pass cut-off radius) must be a positive number, "
                         f"got {d0!r}")
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {mask!r}")
    return float(d0)


def lowpass(x: torch.Tensor, d0: float = 80.0, mask: str = "gaussian",
            backend: str | None = None) -> torch.Tensor:
    """Low-pass filter each image and channel of `x` (B x C x H x W) in the 2-D frequency
    domain: real(IFFT2(ishift(M * shift(FFT2(x))))) with M = exp(-D^2 / (2 d0^2)) ("gaussian")
    or 1[D <= d0] ("ideal"), D the distance from the centre of the shifted spectrum.
    Differentiable with respect to x."""
    d0 = check_lowpass_args(d0, mask)
    if not has_lowpass():
        raise RuntimeError("synq_kernels.lowpass is not available in the installed "
                           "synq_kernels; update it (pip install --no-build-isolation -e .) "
                           "or turn the low-pass filter off (use_lowpass=False)")
    if x.dim() != 4:
        raise ValueError(f"lowpass expects a B x C x H x W batch, got shape {tuple(x.shape)}")
    import synq_kernels
    return synq_kernels.lowpass(x, d0, mask=mask, backend=backend)

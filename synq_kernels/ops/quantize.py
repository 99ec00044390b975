"""8-bit quantization: dynamic, per tensor (`quantize_dynamic`) or per row of a matrix
(`quantize_dynamic_rows`), and static on a given grid, optionally after Hardswish
(`quantize_static`, also after a per-channel affine map or ReLU): the CPU kernels (csrc/cpu/quantize.cpp: two passes over x for the dynamic
ones, one for the static) where they are built, else the reference's PyTorch ops. Both give
the same bits (the kernels repeat the reference's float32 steps)."""
import torch
from torch import Tensor

from ..reference import quantize as R


def _has_kernel() -> bool:
    from .. import _ext
    return _ext.has_cpu_kernels()


if _has_kernel():
    @torch.library.register_fake("synq::_quantize_dynamic")
    def _(x, eps):
        one = (1,) * x.dim()
        return (torch.empty_like(x, dtype=torch.int8), x.new_empty(one),
                x.new_empty(one, dtype=torch.int32))

    @torch.library.register_fake("synq::_quantize_static")
    def _(x, scale, zero, lo, hi, act=0, mul=None, add=None):
        return torch.empty_like(x, dtype=torch.int8)

    @torch.library.register_fake("synq::_quantize_dynamic_rows")
    def _(x, eps):
        m = x.shape[0]
        return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((m, 1)),
                x.new_empty((m, 1), dtype=torch.int32))


def quantize_dynamic(x: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor]:
    """(q, scale, zero) of x on its own 8-bit grid; see reference `quantize_dynamic`."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0
            and _has_kernel()):
        return torch.ops.synq._quantize_dynamic(x, eps)
    return R.quantize_dynamic(x, eps)


def quantize_dynamic_rows(x: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor]:
    """(q, scale, zero) of each row of a 2-D x on its own 8-bit grid; see reference
    `quantize_dynamic_rows`."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and x.numel() > 0 and _has_kernel()):
        return torch.ops.synq._quantize_dynamic_rows(x, eps)
    return R.quantize_dynamic_rows(x, eps)


_ZERO_DTYPES = (torch.float32, torch.int32, torch.int64, torch.int16, torch.int8)


def quantize_static(x: Tensor, scale: Tensor, zero: Tensor, lo: int, hi: int,
                    act: int = 0, mul: Tensor | None = None, add: Tensor | None = None) -> Tensor:
    """int8 of x (times mul plus add per channel, when given) on the grid (scale, zero),
    clamped to [lo, hi], after Hardswish (act 1) or ReLU (act 2); see reference
    `quantize_static`."""
    if not (-128 <= lo <= hi <= 127):
        raise ValueError(f"need -128 <= lo <= hi <= 127, got {lo}, {hi}")
    # the kernel computes in float32: a float64 scale, zero, mul or add would promote the
    # ATen steps
    affine_ok = mul is None or (
        add is not None and x.dim() >= 2 and mul.dtype == add.dtype == torch.float32
        and mul.device.type == add.device.type == "cpu"
        and mul.shape == add.shape == (x.shape[1],))
    if (x.device.type == "cpu" and x.dtype == torch.float32 and scale.numel() == 1
            and zero.numel() == 1 and scale.device.type == "cpu" and zero.device.type == "cpu"
            and scale.dtype == torch.float32 and zero.dtype in _ZERO_DTYPES
            and scale.dim() <= x.dim() and zero.dim() <= x.dim() and affine_ok
            and _has_kernel()):
        return torch.ops.synq._quantize_static(x, scale, zero, lo, hi, act, mul, add)
    return R.quantize_static(x, scale, zero, lo, hi, act, mul, add)

"""`max_pool2d_int8`: 2-D max pooling of int8 tensors (an exported model's max-pool on its
int8 activations, synq.deploy). Backends: "reference" (F.max_pool2d through float, exact),
"cpu" (csrc/cpu/pool.cpp), "triton" (synq_kernels/triton/pool.py). PyTorch has no usable int8
max-pool: none on CUDA, and its CPU kernel refuses inputs of more than 127 positions."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..reference import pool as R
from ..reference.int_gemm import conv_memory_format


def _has_kernel() -> bool:
    from .. import _ext
    return _ext.has_cpu_kernels()


def _cpu(x: Tensor, g: R.PoolGeometry) -> Tensor:
    return torch.ops.synq._max_pool2d_int8(x, [g.kh, g.kw], [g.sh, g.sw], [g.ph, g.pw],
                                           [g.dh, g.dw], [g.oh, g.ow])


backends.register("max_pool2d_int8", "reference", R.max_pool2d_int8)
if _has_kernel():
    backends.register("max_pool2d_int8", "cpu", _cpu)

    @torch.library.register_fake("synq::_max_pool2d_int8")
    def _(x, kernel, stride, padding, dilation, out_size):
        return torch.empty((x.shape[0], x.shape[1], *out_size), dtype=x.dtype, device=x.device,
                           memory_format=conv_memory_format(x))


def max_pool2d_int8(x: Tensor, kernel_size, stride=None, padding=0, dilation=1,
                    ceil_mode: bool = False, backend: str | None = None) -> Tensor:
    """F.max_pool2d of an int8 (B, C, H, W) tensor, without indices, as int8: the same values
    (exact: max commutes with any monotone quantization grid), the same output shape,
    ceil_mode included. The arguments are F.max_pool2d's (stride None: the kernel size);
    padding never wins, as in PyTorch. The output is channels-last for a channels-last input
    (and C > 1), else contiguous.

    Raises ValueError for a tensor that is not 4-D int8, a non-positive kernel size, stride or
    dilation, padding above half the kernel, or an empty output; TypeError for arguments that
    are not ints or pairs of ints."""
    g = R.pool_geometry(x, kernel_size, stride, padding, dilation, ceil_mode)
    be = backends.resolve("max_pool2d_int8", x.device, backend)
    if x.numel() == 0:
        return R.max_pool2d_int8(x, g)
    return backends.implementation("max_pool2d_int8", be)(x, g)

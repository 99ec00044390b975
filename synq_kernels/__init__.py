"""synq_kernels: the fused kernels of synq as PyTorch custom ops.

Every op has the backends "reference" (plain PyTorch), "cpu" (C++), "cuda" (CUDA C++) and
"triton" (channel_stats: no "cuda"); `backend=None` picks the fastest one available for the
input's device.
"""
from . import _ext, backends, compiled  # noqa: F401  (compiled registers cpu / cuda)
from . import reference
from ._checks import value_checks
from .backends import available_backends
from .ops.channel_stats import batch_norm_stats, channel_stats
from .ops.fake_quant import fake_quant, quant_range
from .ops.lowpass import lowpass
from .ops.int_gemm import (int4_matmul, int8_matmul, pack_int4, prepack_conv2d_weight,
                           quantized_conv2d, quantized_conv2d_packed, quantized_linear,
                           unpack_int4, weight_row_sums)
from .ops import int_gemm as _int_gemm
from .ops import quantize as _quantize  # noqa: F401  (registers its fake kernel)
from .ops.pool import max_pool2d_int8

backends.register("fake_quant", "reference",
                  (reference.fake_quant_forward, reference.fake_quant_backward))
backends.register("lowpass", "reference", reference.lowpass_forward)
backends.register("channel_stats", "reference",
                  (reference.channel_stats_forward, reference.channel_stats_backward))
backends.register("batch_norm_stats", "reference",
                  (reference.batch_norm_stats_forward, reference.batch_norm_stats_backward))
backends.register("int_mm", "reference", _int_gemm.reference_int_mm)
backends.register("quantized_linear", "reference", _int_gemm.reference_quantized_linear)
backends.register("quantized_conv2d", "reference", _int_gemm.reference_quantized_conv2d)

try:
    from .triton import fake_quant as _triton_fake_quant  # noqa: F401
except ImportError:  # no triton on this platform: the other backends still work
    pass
try:
    from .triton import lowpass as _triton_lowpass  # noqa: F401
except ImportError:
    pass
try:
    from .triton import int_gemm as _triton_int_gemm  # noqa: F401
except ImportError:
    pass
try:
    from .triton import channel_stats as _triton_channel_stats  # noqa: F401
except ImportError:
    pass
try:
    from .triton import pool as _triton_pool  # noqa: F401
except ImportError:
    pass

__all__ = ["fake_quant", "lowpass", "channel_stats", "batch_norm_stats", "quant_range", "int8_matmul", "int4_matmul", "pack_int4",
           "unpack_int4", "quantized_linear", "quantized_conv2d", "weight_row_sums",
           "prepack_conv2d_weight", "quantized_conv2d_packed", "max_pool2d_int8",
           "available_backends", "value_checks", "backends", "reference"]
__version__ = "0.1.0"

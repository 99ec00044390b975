"""Plain-PyTorch references of every op: the ground truth the other backends are tested
against, and the fallback that runs on any device."""
from .channel_stats import (batch_norm_stats_backward, batch_norm_stats_forward,
                            channel_stats_backward, channel_stats_forward)
from .fake_quant import fake_quant_backward, fake_quant_forward, fake_quant_ste
from . import int_gemm, pool, quantize
from .lowpass import (gaussian_lowpass_matrix, lowpass_backward, lowpass_forward,
                      lowpass_gaussian_separable, lowpass_mask)

__all__ = ["channel_stats_forward", "channel_stats_backward", "batch_norm_stats_forward",
           "batch_norm_stats_backward", "fake_quant_forward", "fake_quant_backward", "fake_quant_ste", "lowpass_forward",
           "lowpass_backward", "lowpass_mask", "gaussian_lowpass_matrix",
           "lowpass_gaussian_separable", "int_gemm", "pool", "quantize"]

"""Plain-PyTorch references of every op: the ground truth the other backends are tested
against, and the fallback that runs on any device."""
from .fake_quant import fake_quant_backward, fake_quant_forward, fake_quant_ste

__all__ = ["fake_quant_forward", "fake_quant_backward", "fake_quant_ste"]

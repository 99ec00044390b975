"""synq: zero-shot quantization of CNNs (SynQ) with hand-written kernels."""

__version__ = "0.1.0"

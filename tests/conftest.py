"""Test-session set-up. Without a CUDA GPU the Triton kernels run on CPU tensors under the
Triton interpreter, which must be switched on before any kernel is defined, i.e. before
synq_kernels is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)

"""The "cpu" and "cuda" backends: thin calls into the kernels of `synq_kernels._C`.

The compiled ops have one schema (csrc/ops.cpp) and per-dispatch-key implementations
(csrc/cpu/, csrc/cuda/), so the same call serves both backends; the backend check happens in
`synq_kernels.backends.resolve`."""
from __future__ import annotations

import torch

from . import backends


def fake_quant_forward(x, scale, zero_point, qmin, qmax, axis):
    return torch.ops.synq._fake_quant_fwd(x, scale, zero_point, qmin, qmax, axis)


def fake_quant_backward(dy, x, scale, zero_point, qmin, qmax, axis, grad_factor, qparam_grads):
    return torch.ops.synq._fake_quant_bwd(dy, x, scale, zero_point, qmin, qmax, axis,
                                          grad_factor, qparam_grads)


for _backend in ("cpu", "cuda"):
    backends.register("fake_quant", _backend, (fake_quant_forward, fake_quant_backward))

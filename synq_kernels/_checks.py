"""Argument checks shared by the ops: each error names the argument, its value and what is
allowed."""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_state = threading.local()


@contextmanager
def value_checks(enabled: bool):
    """Turn the data-dependent checks (a scale with a zero, negative or non-finite entry) on
    or off in this thread. On CUDA tensors they wait for the GPU, so a training loop whose
    scales are known to be valid may turn them off; they are skipped anyway while a CUDA
    graph is being captured."""
    old = getattr(_state, "enabled", True)
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = old


def value_checks_enabled(t: torch.Tensor) -> bool:
    if not getattr(_state, "enabled", True):
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_float_tensor(name: str, t, allowed=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must be a floating tensor ({names}), got dtype {t.dtype}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listed}")


def check_int_range(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int from {lo} to {hi}, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be from {lo} to {hi}, got {value}")
    return value


def check_finite_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# activations an op can fuse; the compiled ops' `act` is the index
ACTIVATIONS = (None, "relu", "relu6")


def activation_index(activation) -> int:
    """The `act` code of `activation` (None, "relu" or "relu6"), or a ValueError."""
    if not (activation is None or isinstance(activation, str)) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got "
                         f"{activation!r}")
    return ACTIVATIONS.index(activation)


def normalize_axis(axis, ndim: int) -> int:
    """Per-channel axis as a non-negative dim; None (per-tensor) as -1."""
    if axis is None:
        return -1
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be None or an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for x with {ndim} dims "
                         f"(allowed {-ndim}..{ndim - 1}, or None for per-tensor)")
    return axis % ndim


def min_max(t: torch.Tensor):
    """(min, max) of a non-empty tensor as Python numbers: one reduction, one read from the
    device."""
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    if t.device.type == "cpu":
        return lo.item(), hi.item()
    return tuple(torch.stack((lo, hi)).tolist())


def check_positive_finite(name: str, t: torch.Tensor) -> None:
    n = t.numel()
    if n == 0 or not value_checks_enabled(t):
        return
    # one reduction and one read (a NaN anywhere makes the min NaN, which fails `lo > 0`);
    # the slower search for the culprit runs only on failure; a per-tensor scale is one
    # read and no reduction (a few microseconds less a call: the ops' Python is most of a
    # small conv's time)
    lo, hi = (t.item(),) * 2 if n == 1 else min_max(t)
    if lo > 0 and hi < math.inf:
        return
    bad = ~(torch.isfinite(t) & (t > 0))
    i = int(bad.flatten().nonzero()[0])
    raise ValueError(f"{name} must be positive and finite everywhere, got "
                     f"{float(t.flatten()[i])} at index {i}")

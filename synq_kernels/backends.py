"""Backend registry: which implementations of each op exist, and which one a call uses.

Backends: "reference" (plain PyTorch, the ground truth, any device), "cpu" (C++ kernels of
`_C`), "cuda" (CUDA kernels of `_C`), "triton" (Triton kernels; on a CPU tensor only under
the Triton interpreter, TRITON_INTERPRET=1). `backend=None` in an op call takes the
SYNQ_BACKEND environment variable if set, else the first available backend in the op's
preference order for the tensor's device type.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")
DEFAULT_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def _triton_reason(device_type: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("Triton runs on CPU tensors only under its interpreter; set TRITON_INTERPRET=1 "
                "before importing synq_kernels")
    if device_type == "cpu":
        from .triton import interpreter_problem
        return interpreter_problem()
    if device_type not in ("cpu", "cuda"):
        return f"Triton kernels are not built for {device_type} tensors"
    return None


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if `backend` can run on tensors of `device_type`, else why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend takes CPU tensors, not {device_type} tensors"
        return None if _ext.has_cpu_kernels() else _ext.missing_reason("cpu")
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend takes CUDA tensors, not {device_type} tensors"
        return None if _ext.has_cuda_kernels() else _ext.missing_reason("cuda")
    if backend == "triton":
        return _triton_reason(device_type)
    return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"


@dataclass(frozen=True)
class OpInfo:
    impls: dict
    preference: dict


_OPS: dict[str, OpInfo] = {}
# resolve(op, device, None) per (op, device type, SYNQ_BACKEND): the availability checks
# cost more than some kernels; cleared whenever the registry changes
_DEFAULT_CACHE: dict[tuple, str] = {}


def register(op: str, backend: str, fn: Callable) -> None:
    """Register `fn` as the `backend` implementation of `op`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _OPS.setdefault(op, OpInfo({}, dict(DEFAULT_PREFERENCE))).impls[backend] = fn
    _DEFAULT_CACHE.clear()


def set_preference(op: str, device_type: str, order: tuple[str, ...]) -> None:
    _OPS.setdefault(op, OpInfo({}, dict(DEFAULT_PREFERENCE))).preference[device_type] = order
    _DEFAULT_CACHE.clear()


def implementation(op: str, backend: str) -> Callable:
    info = _OPS.get(op)
    if info is None or backend not in info.impls:
        raise NotImplementedError(f"synq: no {backend!r} implementation of {op}")
    return info.impls[backend]


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """The backends that can run `op` on `device`, in preference order."""
    device_type = torch.device(device).type
    info = _OPS[op]
    order = list(info.preference.get(device_type, ())) + [b for b in BACKENDS]
    seen = []
    for b in order:
        if b in info.impls and b not in seen and unavailable_reason(b, device_type) is None:
            seen.append(b)
    return seen


def resolve(op: str, device: torch.device, backend: str | None) -> str:
    """The concrete backend a call of `op` on `device` runs with."""
    if backend is not None:
        return _checked(op, device, backend, "backend")
    env = os.environ.get("SYNQ_BACKEND") or None
    key = (op, device.type, env)
    got = _DEFAULT_CACHE.get(key)
    if got is None:
        got = (available_backends(op, device)[0] if env is None
               else _checked(op, device, env, "SYNQ_BACKEND"))
        _DEFAULT_CACHE[key] = got
    return got


def _checked(op: str, device: torch.device, backend, source: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{source}={backend!r} is not a backend; choose one of "
                         f"{', '.join(BACKENDS)} (or None for the fastest available)")
    if backend not in _OPS[op].impls:
        raise NotImplementedError(f"synq: {op} has no {backend!r} backend")
    reason = unavailable_reason(backend, device.type)
    if reason is not None:
        raise RuntimeError(f"synq: {source}={backend!r} cannot run {op} here: {reason}")
    return backend

"""Loading of the compiled extension `synq_kernels._C`, which is optional at run time.

A Python-only install has no `_C`; the reference and Triton backends still work, and asking
for a compiled backend explains how to build it.
"""
from __future__ import annotations

import glob
import os
import warnings

import torch

_BUILD_HINT = (
    "reinstall synq from its source folder with a C++ compiler present: "
    "`pip install --no-build-isolation -e .` (CUDA kernels are built when nvcc and a CUDA "
    "build of torch are present; SYNQ_BUILD_CUDA=1 forces them)"
)


def _load() -> str | None:
    try:
        from . import _C  # noqa: F401  (importing registers the kernels with the dispatcher)
    except ImportError as e:
        built = glob.glob(os.path.join(os.path.dirname(__file__), "_C*.so"))
        if not built:
            return "synq_kernels._C is not built (Python-only install)"
        return f"synq_kernels._C failed to import ({e})"
    except OSError as e:  # a stale .so built against another torch
        warnings.warn(f"synq_kernels._C failed to load: {e}; compiled backends disabled")
        return f"synq_kernels._C failed to load ({e})"
    return None


# Loaded once at import (plain globals rather than a cache, so torch.compile traces the
# backend choice as constants).
_LOAD_ERROR = _load()
_HAS_CUDA = _LOAD_ERROR is None and bool(torch.ops.synq._compiled_with_cuda())


def load_error() -> str | None:
    """None when `_C` is loaded, else why it is not."""
    return _LOAD_ERROR


def has_cpu_kernels() -> bool:
    return _LOAD_ERROR is None


def has_cuda_kernels() -> bool:
    return _HAS_CUDA


def missing_reason(backend: str) -> str:
    if load_error() is not None:
        return f"{load_error()}; {_BUILD_HINT}"
    if backend == "cuda" and not has_cuda_kernels():
        return ("synq_kernels._C was built without its CUDA kernels; " + _BUILD_HINT)
    return ""

"""Version counters for the caches that are kept while a tensor is unchanged (derived
weights, quantization grids and flags, recorded ops, CUDA graphs), and the decorator that
keeps synq's models free of inference tensors, which have none."""
from __future__ import annotations

import functools

import torch


def version(t: torch.Tensor):
    """t's version counter, which in-place ops advance. A tensor made under
    torch.inference_mode has none (reading it raises), and it can still change in place
    there: for one, a new object each call, equal to nothing, so that every cache keyed on it
    is rebuilt (correct, not fast). synq builds its models' tensors outside inference mode
    (quantize_model, load_quantized, export, load_int, .to()), so this is the fallback."""
    return object() if t.is_inference() else t._version


def normal_tensors(fn):
    """`fn` run with torch.inference_mode off, so that the model it builds or moves holds
    normal tensors even when called inside inference mode (its caches then keep working)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)
    return wrapper

"""torch.fx's symbolic trace of a model's forward, for the passes that read its structure
(which activation module follows which BatchNorm, how often a module is called)."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def trace_forward(model: nn.Module) -> torch.fx.Graph | None:
    """The graph of `model`'s forward (its call_module nodes name `model`'s submodules), or
    None where the forward cannot be traced (data-dependent control flow and the like). The
    trace runs on a copy: a forward that stores state on its modules would store proxies."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.fx.Tracer().trace(copy.deepcopy(model))
    except Exception:
        return None

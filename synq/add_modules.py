"""Residual additions written in a forward (`out += identity`, `x + y`) turned into `Add`
modules, so that the integer export sees them (synq.deploy fuses an Add into the conv
before it; an addition it cannot see ends its int8 chain).

The quantized model is traced with torch.fx, its quantized layers, activations and every
torch.nn module kept whole; each `+`, `+=` or `torch.add` of two tensors of the same shape
(shapes from one run on an example input) becomes a call of a new `Add` submodule named
`_synq_add<k>`. A model without such an addition, or whose forward cannot be traced, is
returned as it is; otherwise the result is a torch.fx.GraphModule with the same submodules
under the same names (the same state dict).
"""
from __future__ import annotations

import operator
import warnings

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from . import quant
from .models.common import Add

_ADDS = (operator.add, operator.iadd, torch.add)
_LEAVES = (quant.QuantConv2d, quant.QuantLinear, quant.QuantAct, quant.ActQuantizer,
           quant.WeightQuantizer, Add)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


PREFIX = "_synq_add"


def added_names(model: nn.Module) -> list[str]:
    """The Add modules with_add_modules put into `model`, by name."""
    return sorted(n for n, _ in model.named_children() if n.startswith(PREFIX))


def _tensor_shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def with_add_modules(qmodel: nn.Module, example: torch.Tensor) -> nn.Module:
    """`qmodel` with its residual additions as Add modules (see the module docstring); the
    model itself when there are none or the forward cannot be traced. Not in place."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer().trace(qmodel)
    except Exception:
        return qmodel
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target in _ADDS
            and len(n.args) == 2 and not n.kwargs]
    if not adds:
        return qmodel
    gm = torch.fx.GraphModule(qmodel, graph, class_name=type(qmodel).__name__)
    quantizers = list(quant.act_quantizers(gm).values())
    enabled = [q.enabled for q in quantizers]
    for q in quantizers:  # shapes only: an uncalibrated model (load_int rebuilds one) runs too
        q.enabled = False
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception:
        return qmodel
    finally:
        for q, e in zip(quantizers, enabled):
            q.enabled = e
    k = 0
    for node in adds:
        a, b = (_tensor_shape(x) for x in node.args)
        if a is None or a != b:  # a broadcast, a scalar: not a residual addition
            continue
        while hasattr(gm, f"{PREFIX}{k}"):
            k += 1
        gm.add_module(f"{PREFIX}{k}", Add())
        with graph.inserting_after(node):
            new = graph.call_module(f"{PREFIX}{k}", tuple(node.args))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    if not added_names(gm):
        return qmodel
    graph.lint()
    gm.recompile()
    for hook in qmodel._forward_pre_hooks.values():  # the root's (quantize_model's call count)
        gm.register_forward_pre_hook(hook)
    for attr in ("quant_config", "meta"):
        if hasattr(qmodel, attr):
            setattr(gm, attr, getattr(qmodel, attr))
    return gm

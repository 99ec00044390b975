"""Fake-quantized models: weight and activation quantizers, quantized Conv2d / Linear, and
`quantize_model`, which turns a float CNN into its fake-quantized copy.

The quantizer is the one of the SynQ paper (METHOD.md section 2):

- weights: per-output-channel, asymmetric, range = min / max of the current float weights,
  recomputed at every forward (under no_grad, so the range itself gets no gradient);
- activations: per-tensor, asymmetric (unsigned grid), one quantizer after every ReLU / ReLU6
  / Hardswish / SiLU module (residual adds followed by a ReLU are covered by the quantizer of
  that ReLU; the zero point moves up for the small negative values of Hardswish and SiLU);
  the gates of squeeze-and-excitation blocks (Sigmoid, Hardsigmoid) stay float; range =
  EMA (momentum 0.9) of the batch min / max while calibrating, then frozen;
- every fake quantization goes through `synq_kernels.fake_quant` (straight-through estimator
  for the input, LSQ+ gradients for learnable scale / zero point);
- BatchNorm is left untouched in floating point.

Ranges always include zero, so that zero (padding, dead ReLUs) is exactly representable.
"""
from __future__ import annotations

import copy
import itertools
import math
import warnings
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

import synq_kernels

from . import distributed
from .tracing import trace_forward
from .versions import normal_tensors, version

__all__ = ["WeightQuantizer", "ActQuantizer", "QuantAct", "QuantConv2d", "QuantLinear",
           "quantize_model", "quant_layers", "act_quantizers", "set_calibration",
           "calibrate", "check_bits", "LEARNABLE_MODES", "QUANTIZED_ACTIVATIONS"]

LEARNABLE_MODES = (None, "lsq", "lsq+")
_EPS = 1e-8  # smallest scale: a constant tensor (max == min) quantizes to itself, no NaN

# Activation modules that get an activation quantizer after them (QuantAct). The gates of
# squeeze-and-excitation blocks (nn.Sigmoid, nn.Hardsigmoid) stay float, as BatchNorm does:
# their output scales features rather than feeding a layer.
QUANTIZED_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU)
# Modules that quantize_model refuses: weight-bearing layers it has no quantized version of,
# and non-linearities after which it would silently leave the activations in float.
_UNSUPPORTED_ACTIVATIONS = (nn.GELU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
                            nn.Softplus, nn.Hardtanh)
_FLOAT_OK = (nn.BatchNorm1d, nn.BatchNorm2d)


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A channels-last 4-D tensor as its NHWC view (dim 0 stays first; the memory order, so
    reductions and reshapes need no copy); any other tensor as it is."""
    if t.dim() == 4 and not t.is_contiguous() and \
            t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1)
    return t


def check_bits(name: str, bits) -> int:
    """`bits` as an int from 2 to 8, else a ValueError naming `name`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name} must be an integer from 2 to 8, got {bits!r}")
    return bits


def _check_learnable(learnable):
    if learnable not in LEARNABLE_MODES:
        raise ValueError(f"learnable must be one of None, 'lsq', 'lsq+', got {learnable!r}")
    return learnable


def _asym_params(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int):
    """Scale and (float) zero point mapping [lo, hi] (widened to hold 0) onto [qmin, qmax]."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=_EPS)
    zero_point = qmin - lo / scale
    return scale.float(), zero_point.float()


class WeightQuantizer(nn.Module):
    """Per-output-channel (dim 0) weight quantizer.

    Not learnable: scale / zero point come from the min / max of the current weights at every
    forward, computed under no_grad (the paper's quantizer). `learnable="lsq"`: the scale is an
    nn.Parameter initialized from the weights' range, the zero point a fixed buffer;
    `"lsq+"`: both are parameters. Their gradients are scaled by 1 / sqrt(n * qmax) with n the
    number of weights per output channel (LSQ's gradient scale).
    """

    def __init__(self, weight: torch.Tensor, bits: int, symmetric: bool = False,
                 learnable=None, backend: str | None = None):
        super().__init__()
        self.bits = check_bits("weight bits", bits)
        self.symmetric = bool(symmetric)
        self.learnable = _check_learnable(learnable)
        self.backend = backend
        self.qmin, self.qmax = synq_kernels.quant_range(bits, self.symmetric)
        per_channel = weight[0].numel() if weight.dim() > 1 else 1
        self.grad_factor = 1.0 / math.sqrt(per_channel * self.qmax)
        if self.learnable is not None:
            scale, zero_point = self._minmax_params(weight.detach())
            self.scale = nn.Parameter(scale.clone())
            if self.learnable == "lsq+" and not self.symmetric:
                self.zero_point = nn.Parameter(zero_point.clone())
            else:
                self.register_buffer("zero_point", zero_point.clone())

    def _minmax_params(self, w: torch.Tensor):
        # a channels-last weight (fine-tuning runs its models so) in memory order: its rows
        # are then views; reshaping w itself copied it at each forward
        flat = _memory_order(w).reshape(w.shape[0], -1)
        if self.symmetric:
            amax = flat.abs().amax(dim=1)
            scale = torch.clamp(amax / float(self.qmax), min=_EPS).float()
            return scale, torch.zeros_like(scale)
        if flat.is_cuda:
            lo, hi = torch.aminmax(flat, dim=1)  # one pass (and one launch) for both
        else:
            # torch's CPU aminmax along a dim does not vectorize: 2-25x the time of amin and
            # amax (512x4608: 5.1 ms against 0.22 ms on one thread); the same values
            lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        return _asym_params(lo, hi, self.qmin, self.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.learnable is None:
            with torch.no_grad():
                scale, zero_point = self._minmax_params(w.detach())
            grad_factor = 1.0
        else:
            scale, zero_point, grad_factor = self.scale, self.zero_point, self.grad_factor
        return synq_kernels.fake_quant(w, scale, zero_point, self.bits, signed=self.symmetric,
                                       axis=0, grad_factor=grad_factor, backend=self.backend)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, per-channel {kind}, learnable={self.learnable}"


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer with an EMA-calibrated, then frozen, range.

    While `calibrating`, each forward folds the batch min / max into the running range
    (first batch: taken as is; later: running = momentum * running + (1 - momentum) * batch)
    and quantizes with the updated range. With `sync_ranks` set (fine-tuning on several
    processes does it) the batch min / max are first reduced over all ranks, so every rank
    folds in the global batch's range and all keep identical ranges; every rank must then run
    the same forwards. `freeze()` ends calibration; with a learnable mode the
    frozen range initializes the scale (and, for "lsq+", zero point) parameters.
    The range lives in buffers, so it is part of the state dict (checkpoints keep it).
    """

    def __init__(self, bits: int, momentum: float = 0.9, learnable=None,
                 backend: str | None = None):
        super().__init__()
        self.bits = check_bits("activation bits", bits)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.learnable = _check_learnable(learnable)
        self.backend = backend
        self.qmin, self.qmax = synq_kernels.quant_range(bits, False)
        self.calibrating = False
        self.sync_ranks = False
        self.enabled = True
        self.name = ""  # set by quantize_model, for error messages
        self._init_seen = None  # (buffer, its version, value): see is_initialized
        self._has_range = False  # the flag's value as last seen, for compiled forwards
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        if self.learnable is not None:
            self.scale = nn.Parameter(torch.ones(()))
            if self.learnable == "lsq+":
                self.zero_point = nn.Parameter(torch.zeros(()))
            else:
                self.register_buffer("zero_point", torch.zeros(()))

    def is_initialized(self) -> bool:
        """Whether a range has been calibrated. The flag is a buffer (checkpoints keep it);
        its value is read from the device once and reused while the buffer is the same tensor
        at the same version, so a forward on a GPU does not wait for it every time
        (load_state_dict, fill_ and .to() all change the identity or the version).

        Under torch.compile neither the value nor the version can be read while tracing: the
        answer is then the value that calibration, load_state_dict or the last eager check
        saw (a Python attribute, which the compiled graph is guarded on)."""
        if torch.compiler.is_compiling():
            return self._has_range
        buf = self.initialized
        seen = self._init_seen
        if seen is None or seen[0] is not buf or seen[1] != version(buf):
            seen = self._init_seen = (buf, version(buf), bool(buf))
            self._has_range = seen[2]
        return seen[2]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._has_range = bool(self.initialized)

    def __setstate__(self, state):  # pickled before _has_range existed
        super().__setstate__(state)
        if "_has_range" not in self.__dict__:
            self._has_range = bool(self.initialized)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        # the same values in memory order: a full reduction of a channels-last tensor makes
        # a contiguous copy first (8x the time of the reduction on the CPU)
        x = _memory_order(x.detach())
        # aminmax: one launch on a GPU; on a CPU amin and amax take 0.6x its time
        lo, hi = (t.float() for t in (torch.aminmax(x) if x.is_cuda else (x.amin(), x.amax())))
        if self.sync_ranks:
            lo, hi = distributed.all_reduce_min_max(lo, hi)
        if not self.is_initialized():
            self.running_min.copy_(lo)
            self.running_max.copy_(hi)
            self.initialized.fill_(True)
            self._has_range = True
        else:
            m = self.momentum
            self.running_min.mul_(m).add_(lo, alpha=1 - m)
            self.running_max.mul_(m).add_(hi, alpha=1 - m)

    @torch.no_grad()
    def freeze(self) -> None:
        """Stop calibrating; a learnable quantizer takes the calibrated range as its start."""
        self.calibrating = False
        if self.learnable is not None and self.is_initialized():
            scale, zero_point = _asym_params(self.running_min, self.running_max,
                                             self.qmin, self.qmax)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """Fake-quantize x, or with `activation` ("relu" / "relu6") its activation, which the
        fake_quant kernel then applies in the same pass (QuantAct does this)."""
        if activation is not None and (self.calibrating or not self.enabled):
            x, activation = _ACTIVATION_FNS[activation](x), None  # observed / passed as is
        if not self.enabled:
            return x
        if self.calibrating:
            self._observe(x)
        elif not self.is_initialized():
            raise RuntimeError(f"activation quantizer {self.name or '(unnamed)'} has no range: "
                               f"calibrate the model first (synq.quant.calibrate)")
        if self.learnable is not None and not self.calibrating:
            return synq_kernels.fake_quant(x, self.scale, self.zero_point, self.bits,
                                           grad_factor=1.0 / math.sqrt(x[0].numel() * self.qmax),
                                           activation=activation, backend=self.backend)
        scale, zero_point = self._frozen_params()
        return synq_kernels.fake_quant(x, scale, zero_point, self.bits, activation=activation,
                                       backend=self.backend)

    def _frozen_params(self):
        """Scale and zero point of the running range, kept while its buffers are the same
        tensors at the same versions (a fine-tuning step would otherwise recompute them, eight
        small device ops per quantizer, from a range that no longer changes)."""
        lo, hi = self.running_min, self.running_max
        if torch.compiler.is_compiling() or self.calibrating:
            with torch.no_grad():
                return _asym_params(lo, hi, self.qmin, self.qmax)
        c = getattr(self, "_params_cache", None)  # (lo, its version, hi, its version, params)
        if c is None or not (c[0] is lo and c[1] == version(lo) and c[2] is hi
                             and c[3] == version(hi)):
            with torch.no_grad():
                c = self._params_cache = (lo, version(lo), hi, version(hi),
                                          _asym_params(lo, hi, self.qmin, self.qmax))
        return c[4]

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, per-tensor asymmetric, momentum={self.momentum}, "
                f"learnable={self.learnable}")


_ACTIVATION_FNS = {"relu": torch.relu, "relu6": F.relu6}
# activation modules that the kernels can apply themselves: their `activation` name
FUSED_ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6"}


class QuantAct(nn.Module):
    """An activation module (ReLU, ReLU6, Hardswish or SiLU) followed by its activation
    quantizer (asymmetric: the grid holds Hardswish's and SiLU's small negative values).

    A module that the forward calls at several places (torchvision's ResNet blocks call one
    `self.relu` after the first conv and again after the residual add) gets a quantizer per
    call: `quantizer` for the first call of each forward, `extra_quantizers[i]` for call
    i + 2, so that each activation keeps its own range instead of a blend of them all. The
    calls are counted from each forward of the model quantize_model returned (a hook on it
    resets the count).

    Once calibrated, the activation runs inside the fake_quant kernel (one pass over memory
    forward and backward instead of two, the same values and gradients), unless the kernels
    resolve to the reference backend, which keeps the plain PyTorch sequence."""

    _counts_calls = True  # _reset_act_calls resets _calls at each forward of the model

    def __init__(self, act: nn.Module, quantizer: ActQuantizer, extra_quantizers=()):
        super().__init__()
        self.act = act
        self.quantizer = quantizer
        self.extra_quantizers = nn.ModuleList(extra_quantizers)
        self._calls = 0  # calls since the model's forward began
        self._warned = False

    def __setstate__(self, state):  # a QuantAct pickled before per-call quantizers existed
        super().__setstate__(state)
        self.__dict__.setdefault("_calls", 0)
        self.__dict__.setdefault("_warned", False)
        if "extra_quantizers" not in self._modules:
            self.extra_quantizers = nn.ModuleList()

    def _next_quantizer(self) -> ActQuantizer:
        i, self._calls = self._calls, self._calls + 1
        n = 1 + len(self.extra_quantizers)
        if i >= n and not self._warned and self.quantizer.calibrating:
            self._warned = True
            warnings.warn(f"activation module {self.quantizer.name or '(unnamed)'} runs more "
                          f"than {n} time(s) per forward, with one range for all its calls "
                          f"(its call sites could not be traced): give each call its own "
                          f"{type(self.act).__name__} module for a range each", stacklevel=3)
        i %= n
        return self.quantizer if i == 0 else self.extra_quantizers[i - 1]

    def forward(self, x):
        q = self._next_quantizer()
        activation = FUSED_ACTIVATIONS.get(type(self.act))
        if activation is None or not q.enabled or q.calibrating or \
                synq_kernels.backends.resolve("fake_quant", x.device, q.backend) == "reference":
            return q(self.act(x))
        return q(x, activation=activation)


def _with_weight_quantizer(cls, layer: nn.Module, bits, symmetric, learnable, backend):
    """A `cls` sharing `layer`'s parameters, buffers and attributes (so it loads the float
    layer's state dict), plus a WeightQuantizer of its weight."""
    q = cls.__new__(cls)
    q.__dict__ = copy.copy(layer.__dict__)
    q._parameters = dict(layer._parameters)
    q._buffers = dict(layer._buffers)
    q._modules = dict(layer._modules)
    q.weight_quantizer = WeightQuantizer(layer.weight, bits, symmetric, learnable, backend)
    return q


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d whose weight passes through a WeightQuantizer at every forward. Keeps the
    float parameters under the same names, so it loads an nn.Conv2d state dict."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: int, symmetric=False, learnable=None,
                   backend=None) -> "QuantConv2d":
        return _with_weight_quantizer(cls, conv, bits, symmetric, learnable, backend)

    def forward(self, x):
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantLinear(nn.Linear):
    """nn.Linear with a per-output-channel WeightQuantizer (same parameter names)."""

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int, symmetric=False, learnable=None,
                   backend=None) -> "QuantLinear":
        return _with_weight_quantizer(cls, linear, bits, symmetric, learnable, backend)

    def forward(self, x):
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


def _reset_act_calls(model: nn.Module, args) -> None:
    """Forward pre-hook of a quantized model: a new forward, so each per-call module's
    (QuantAct, synq.deploy.IntAct: class attribute `_counts_calls`) next call is its first
    again (a module-level function: copies of the model reset their own)."""
    for m in model.modules():
        if getattr(type(m), "_counts_calls", False):
            m._calls = 0


def _activation_calls(model: nn.Module) -> dict[str, int]:
    """{name: calls per forward} of the activation modules (QUANTIZED_ACTIVATIONS) that
    torch.fx's trace of the forward shows called more than once; {} where the forward cannot
    be traced (then QuantAct warns at calibration if one is)."""
    graph = trace_forward(model)
    if graph is None:
        return {}
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module" and \
                type(model.get_submodule(node.target)) in QUANTIZED_ACTIVATIONS:
            calls[node.target] = calls.get(node.target, 0) + 1
    return {k: n for k, n in calls.items() if n > 1}


def _check_supported(model: nn.Module) -> list[str]:
    """Names of the Conv2d / Linear layers in registration order; ValueError for a module the
    quantizer cannot handle."""
    layers = []
    for name, m in model.named_modules():
        shown = name or "(the model itself)"
        if isinstance(m, (QuantConv2d, QuantLinear, QuantAct, ActQuantizer, WeightQuantizer)):
            raise ValueError(f"module {shown} ({type(m).__name__}) is already quantized; pass "
                             f"the float model to quantize_model")
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            layers.append(name)
            continue
        if type(m) in QUANTIZED_ACTIVATIONS:  # ReLU6 is a Hardtanh subclass: test it first
            continue
        if isinstance(m, _UNSUPPORTED_ACTIVATIONS):
            raise ValueError(f"cannot quantize module {shown} ({type(m).__name__}): activation "
                             f"quantizers are placed after ReLU, ReLU6, Hardswish and SiLU "
                             f"only, so its output would stay in floating point")
        own = [p for p, _ in m.named_parameters(recurse=False)]
        if own and not isinstance(m, _FLOAT_OK):
            raise ValueError(f"cannot quantize module {shown} ({type(m).__name__}): only Conv2d "
                             f"and Linear layers are quantized (BatchNorm stays in float); "
                             f"it holds parameters {', '.join(own)}")
    if not layers:
        raise ValueError("the model has no Conv2d or Linear layer to quantize")
    return layers


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at `name`, and at every other name that registers the same module: a module
    can be registered twice (self.relu2 = self.relu), and named_modules() lists it once, so
    its other names would keep the old module (an unquantized layer, a fake-quantized
    activation in an integer model)."""
    old = root.get_submodule(name)
    names = [n for n, m in root.named_modules(remove_duplicate=False) if m is old] or [name]
    for n in names:  # (listed before any change: `new` may hold `old`, as QuantAct.act)
        parent, _, child = n.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, new)


@normal_tensors
def quantize_model(model: nn.Module, wbits: int = 4, abits: int = 4, *,
                   first_last_bits: int | None = None, symmetric_weights: bool = False,
                   learnable: str | None = None, act_momentum: float = 0.9,
                   backend: str | None = None) -> nn.Module:
    """A fake-quantized deep copy of `model` (the input model is left untouched).

    Every nn.Conv2d / nn.Linear becomes a QuantConv2d / QuantLinear with `wbits`-bit
    per-output-channel weights; every nn.ReLU / nn.ReLU6 / nn.Hardswish / nn.SiLU module
    becomes a QuantAct whose `abits`-bit quantizer must be calibrated (see `calibrate` / `set_calibration`) before the
    model is evaluated. BatchNorm stays in float. The copy is returned in eval mode.

    Args:
        first_last_bits: weight bits of the first and last Conv2d / Linear (registration
            order); None uses `wbits` for them too (the paper's setting), 8 is the usual
            deployment policy.
        symmetric_weights: signed symmetric weight grid (zero point 0) instead of asymmetric.
        learnable: None (min/max ranges, the paper), "lsq" (learnable step sizes) or "lsq+"
            (learnable step sizes and zero points) for weights and activations.
        backend: the synq_kernels backend for every fake_quant call (None: fastest available).

    A ReLU module called at several places in the forward gets a quantizer per call (see
    QuantAct). Functional non-linearities (F.relu in a forward) cannot be seen and get no
    quantizer.
    """
    check_bits("wbits", wbits)
    check_bits("abits", abits)
    if first_last_bits is not None:
        check_bits("first_last_bits", first_last_bits)
    _check_learnable(learnable)
    if backend is not None and backend not in synq_kernels.backends.BACKENDS:
        raise ValueError(f"backend must be None or one of "
                         f"{', '.join(synq_kernels.backends.BACKENDS)}, got {backend!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = _check_supported(model)
    edge = {layers[0], layers[-1]} if first_last_bits is not None else set()

    qmodel = copy.deepcopy(model)
    shared = _activation_calls(qmodel)
    # A new activation quantizer's range buffers go where the model is (a model moved to a GPU
    # before quantization must not get CPU ranges): the device of the nearest tensor above.
    device = next(itertools.chain(qmodel.parameters(), qmodel.buffers()),
                  torch.empty(0)).device
    for name, m in list(qmodel.named_modules()):
        if name in layers:
            bits = first_last_bits if name in edge else wbits
            cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
            new = cls.from_float(m, bits, symmetric_weights, learnable, backend)
        elif type(m) in QUANTIZED_ACTIVATIONS:
            quantizers = []
            for i in range(shared.get(name, 1)):
                with torch.device(device):  # made there: .to() copied 3 buffers from the
                    # host per quantizer, each a synchronizing copy on a GPU (57 for ResNet-20)
                    quantizers.append(ActQuantizer(abits, act_momentum, learnable, backend))
                quantizers[-1].name = name if i == 0 else f"{name} (call {i + 1})"
            new = QuantAct(m, quantizers[0], quantizers[1:])
        else:
            continue
        _set_child(qmodel, name, new)  # (under each of its names)
    qmodel.register_forward_pre_hook(_reset_act_calls)
    qmodel.quant_config = {"wbits": wbits, "abits": abits, "first_last_bits": first_last_bits,
                           "symmetric_weights": symmetric_weights, "learnable": learnable,
                           "act_momentum": act_momentum, "backend": backend}
    return qmodel.eval()


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> QuantConv2d / QuantLinear of a quantized model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def act_quantizers(model: nn.Module) -> dict[str, ActQuantizer]:
    """name -> ActQuantizer of a quantized model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}


def set_calibration(model: nn.Module, enabled: bool) -> None:
    """Start (True) or end (False: freeze the ranges) activation-range calibration."""
    for q in act_quantizers(model).values():
        if enabled:
            q.calibrating = True
        else:
            q.freeze()


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, device=None) -> nn.Module:
    """Calibrate the activation ranges of a quantized model on `batches` (tensors or
    (x, y) pairs), then freeze them. The model is put in eval mode (BN statistics untouched)."""
    model.eval()
    set_calibration(model, True)
    seen = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if device is not None:
                x = x.to(device)
            model(x)
            seen += 1
    finally:
        set_calibration(model, False)
    if seen == 0:
        raise ValueError("calibrate got no batches")
    return model

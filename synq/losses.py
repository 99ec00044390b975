"""The losses of synthesis and fine-tuning (METHOD.md sections 1 and 3), as plain functions of
tensors so each can be checked against a hand computation.

Synthesis: `bns_loss` (BatchNorm-statistics matching), `focal_ce` (hard-sample CE),
`lbns_loss` (TexQ class-centre statistics). Fine-tuning: `kd_loss`, `difficulty`,
`easy_ce`, `gradcam_map` / `cam_loss`, and the optional HAST terms `attention_map` /
`feature_attention_loss`. `BNStats` and `ActivationCapture` are the recording helpers
(context managers: hooks or wrapped forwards installed once, removed on exit).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import synq_kernels

from .quant import FUSED_ACTIVATIONS
from .tracing import trace_forward

__all__ = ["bns_loss", "focal_ce", "lbns_loss", "kd_loss", "difficulty", "easy_ce", "easy_ce_sum",
           "gradcam_map", "cam_loss", "attention_map", "feature_attention_loss", "BNStats",
           "ActivationCapture", "batch_stats", "check_tau"]


# ---------------------------------------------------------------------------------------------
# statistics and hooks

def batch_stats(x: torch.Tensor, per_sample: bool = False):
    """Channel mean and biased variance of a B x C x H x W tensor over (B, H, W), or over
    (H, W) for each sample (`per_sample`: B x C each). A B x C tensor (BatchNorm1d input)
    reduces over B."""
    if x.dim() == 2 and not per_sample:
        var, mean = torch.var_mean(x, dim=0, unbiased=False)
        return mean, var
    if x.dim() != 4:
        raise ValueError(f"batch_stats needs a B x C x H x W (or B x C) tensor, "
                         f"got shape {tuple(x.shape)}")
    if not per_sample:
        # synq_kernels.channel_stats: on the CPU one read forward and one pass backward,
        # against several for torch.var_mean and its autograd (the cost of a BNS step)
        mean, var = synq_kernels.channel_stats(x)
        return mean.to(x.dtype), var.to(x.dtype)
    var, mean = torch.var_mean(x.flatten(2), dim=2, unbiased=False)
    return mean, var


def _relus_after_bn(model: nn.Module) -> dict[int, nn.Module]:
    """{id(bn): act} for every BatchNorm2d of `model` whose output, at each of its calls in
    the forward, goes to one nn.ReLU or nn.ReLU6 module and nowhere else (torch.fx's trace of
    the forward); {} where the forward cannot be traced."""
    graph = trace_forward(model)
    if graph is None:  # no ReLU fusion
        return {}
    found, bad = {}, set()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn = model.get_submodule(node.target)
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        users = list(node.users)
        relu = (model.get_submodule(users[0].target)
                if len(users) == 1 and users[0].op == "call_module" else None)
        if type(relu) not in FUSED_ACTIVATIONS or found.setdefault(id(bn), relu) is not relu:
            bad.add(id(bn))
    return {k: v for k, v in found.items() if k not in bad}


class BNStats:
    """Records, at every forward of `model`, the input of each BatchNorm layer (`.inputs[i]`
    is the input tensor of `.layers[i]` at the last forward) and, where the layer ran fused,
    its channel statistics (`.stats[i]`: (mean, var), else None).

    Fused: a BatchNorm2d in eval mode whose parameters need no gradient, on a float32 CPU
    tensor, runs `synq_kernels.batch_norm_stats` (BatchNorm and the statistics of its input in
    one read, their backward in one pass) when channel_stats would run on the cpu backend
    anyway. Where the traced forward sends the layer's output only to an nn.ReLU or nn.ReLU6
    module, the op applies it too and that module passes the result through. The values are bit for
    bit those of the separate layers and channel_stats. Other layers run as they are;
    `fused=False` turns it all off.

    Use as a context manager: the layers' forwards are wrapped on entry and restored on exit."""

    def __init__(self, model: nn.Module, fused: bool = True):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.names = [n for n, m in model.named_modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not self.layers:
            raise ValueError(f"BN-statistics synthesis needs a model with BatchNorm layers; "
                             f"{type(model).__name__} has none")
        self.model, self.fused = model, fused
        self.inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self._wrapped: list[nn.Module] = []
        self._relu_out: dict[int, torch.Tensor] = {}  # id(relu) -> the fused output it passes

    def __enter__(self):
        relus = _relus_after_bn(self.model) if self.fused else {}
        for i, bn in enumerate(self.layers):
            self._wrap(bn, self._forward(i, bn, relus.get(id(bn))), self.names[i])
        for relu in {id(r): r for r in relus.values()}.values():
            self._wrap(relu, self._relu_forward(relu), "ReLU")
        return self

    def _wrap(self, module, forward, name):
        if "forward" in vars(module):
            self.__exit__()
            raise RuntimeError(f"layer {name!r} is already wrapped (nested BNStats on one "
                               f"model?)")
        module.forward = forward
        self._wrapped.append(module)

    def _can_fuse(self, bn, x) -> bool:
        return (self.fused and type(bn).forward is nn.BatchNorm2d.forward and not bn.training
                and bn.running_mean is not None and x.dim() == 4
                and x.device.type == "cpu" and x.dtype == torch.float32
                and not any(p.requires_grad for p in bn.parameters(recurse=False))
                and synq_kernels.backends.resolve("channel_stats", x.device, None) == "cpu")

    def _forward(self, i, bn, relu):
        plain = type(bn).forward

        def forward(x):
            self.inputs[i] = x
            if self._can_fuse(bn, x):
                y, mean, var = synq_kernels.batch_norm_stats(
                    x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps,
                    activation=FUSED_ACTIVATIONS[type(relu)] if relu is not None else None,
                    backend="cpu")
                self.stats[i] = (mean, var)
                if relu is not None:
                    self._relu_out[id(relu)] = y
                return y
            self.stats[i] = None
            return plain(bn, x)
        return forward

    def _relu_forward(self, relu):
        plain = type(relu).forward

        def forward(x):
            if self._relu_out.pop(id(relu), None) is x:  # already applied by the BN op
                return x
            return plain(relu, x)
        return forward

    def __exit__(self, *exc):
        for m in self._wrapped:
            del m.forward
        self._wrapped.clear()
        self._relu_out.clear()
        self.inputs = [None] * len(self.layers)
        self.stats = [None] * len(self.layers)
        return False


class ActivationCapture:
    """Forward hooks that keep the output of named modules at each forward (`.outputs[name]`).

    With `make_leaf=True` the captured output is replaced by a detached copy that requires
    grad, so a frozen model (no parameter needs grad) still builds the graph from that
    activation to its output: torch.autograd.grad(score, capture.outputs[name]) is then the
    Grad-CAM gradient without touching the layers below it. With `copy_out=True` the model
    goes on with a copy of the captured output, so that an in-place op after the layer
    (torchvision's DenseNet applies F.relu(inplace=True) to its final BatchNorm's output)
    changes neither the captured map nor, for a leaf, raises. Use as a context manager; hooks
    are registered once on entry and removed on exit."""

    def __init__(self, model: nn.Module, names: Sequence[str], make_leaf: bool = False,
                 copy_out: bool = False):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"module(s) {', '.join(map(repr, missing))} not found in "
                             f"{type(model).__name__}")
        self.modules = {n: modules[n] for n in names}
        self.make_leaf, self.copy_out = make_leaf, copy_out
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for n, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._hook(n)))
        return self

    def _hook(self, name):
        def hook(module, inputs, output):
            if self.make_leaf and torch.is_grad_enabled():
                output = output.detach().requires_grad_(True)
                self.outputs[name] = output
                return output.clone() if self.copy_out else output
            self.outputs[name] = output
            return output.clone() if self.copy_out else None
        return hook

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.outputs.clear()
        return False


# ---------------------------------------------------------------------------------------------
# synthesis

def bns_loss(inputs: Sequence[torch.Tensor], bns: Sequence[nn.Module],
             weights: Sequence[float] | None = None,
             stats: Sequence[tuple | None] | None = None) -> torch.Tensor:
    """BNS = mean over BN layers l of w_l * (MSE(mu_l, running_mean_l) + MSE(var_l,
    running_var_l)), mu / var the channel mean / biased variance of the layer's input batch.
    `stats[l]`, where given and not None, is that (mu_l, var_l) already computed (BNStats's
    fused layers); otherwise it is taken from inputs[l]."""
    if len(inputs) != len(bns) or not bns:
        raise ValueError(f"bns_loss needs one input per BN layer, got {len(inputs)} inputs "
                         f"for {len(bns)} layers")
    if stats is not None and len(stats) != len(bns):
        raise ValueError(f"bns_loss got {len(stats)} stats for {len(bns)} layers")
    total = 0.0
    for i, (x, bn) in enumerate(zip(inputs, bns)):
        if stats is not None and stats[i] is not None:
            mean, var = (s.to(x.dtype) for s in stats[i])
        else:
            mean, var = batch_stats(x)
        term = F.mse_loss(mean, bn.running_mean) + F.mse_loss(var, bn.running_var)
        total = total + (weights[i] if weights is not None else 1.0) * term
    return total / len(bns)


def focal_ce(logits: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """mean over the batch of (1 - p_y)^gamma * CE(logits, y) (the hard-sample CE)."""
    ce = F.cross_entropy(logits, y, reduction="none")
    p_y = torch.exp(-ce)
    return ((1.0 - p_y).clamp(min=0.0).pow(gamma) * ce).mean()


def lbns_loss(inputs: Sequence[torch.Tensor], y: torch.Tensor,
              centre_means: Sequence[torch.Tensor], centre_vars: Sequence[torch.Tensor]):
    """Class-centre statistics matching (TexQ's L-BNS): for each given layer, the per-sample
    channel mean / variance of sample i against those of the centre image of class y_i (MSE),
    averaged over layers. centre_means[l] / centre_vars[l] are num_classes x C."""
    if not inputs:
        raise ValueError("lbns_loss needs at least one layer")
    total = 0.0
    for x, cm, cv in zip(inputs, centre_means, centre_vars):
        mean, var = batch_stats(x, per_sample=True)
        total = total + F.mse_loss(mean, cm[y]) + F.mse_loss(var, cv[y])
    return total / len(inputs)


# ---------------------------------------------------------------------------------------------
# fine-tuning

def check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < tau <= 1.0:
        raise ValueError(f"tau (the difficulty threshold) must lie in (0, 1], got {tau!r}")
    return float(tau)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 20.0, alpha: float = 20.0) -> torch.Tensor:
    """alpha * temperature^2 * KL(softmax(T / temp) || softmax(S / temp)), batch mean."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    return kl * (alpha * temperature * temperature)


def difficulty(teacher_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """delta = 1 - softmax(teacher_logits)[y] per sample (no gradient)."""
    with torch.no_grad():
        return 1.0 - F.softmax(teacher_logits.float(), dim=1).gather(1, y[:, None]).squeeze(1)


def easy_ce(logits: torch.Tensor, y: torch.Tensor, easy: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the samples where `easy` is True; 0 (still attached to the
    graph) when no sample is easy."""
    if easy.dtype != torch.bool or easy.shape != y.shape:
        raise ValueError(f"easy must be a bool mask of shape {tuple(y.shape)}, got "
                         f"{easy.dtype} {tuple(easy.shape)}")
    return easy_ce_sum(logits, y, easy) / easy.sum().clamp(min=1)


def easy_ce_sum(logits: torch.Tensor, y: torch.Tensor, easy: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropies of the easy samples: masked instead of indexed, so that it
    never waits for the GPU (a bool index, like a branch on the count, would)."""
    return torch.where(easy, F.cross_entropy(logits, y, reduction="none"), 0.0).sum()


def gradcam_map(activation: torch.Tensor, grad: torch.Tensor, size, eps: float = 1e-8):
    """Grad-CAM: weights w_c = spatial mean of `grad`; map = ReLU(sum_c w_c A_c), bilinearly
    upsampled to `size` (H, W), min-max normalized per sample with `eps` in the denominator
    (a flat map becomes 0, not NaN). The weights are detached; the map is differentiable with
    respect to `activation`. Returns B x H x W."""
    if activation.dim() != 4 or grad.shape != activation.shape:
        raise ValueError(f"gradcam_map needs a B x C x H x W activation and a gradient of the "
                         f"same shape, got {tuple(activation.shape)} and {tuple(grad.shape)}")
    w = grad.detach().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((w * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
    flat = cam.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    return (cam - lo) / (hi - lo + eps)


def cam_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """MSE between the student's and the (detached) teacher's normalized Grad-CAM maps."""
    return F.mse_loss(student_map, teacher_map.detach())


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Attention map of a B x C x H x W feature: the channel mean of its square, flattened and
    L2-normalized per sample (attention transfer, as HAST uses)."""
    return F.normalize(feature.pow(2).mean(dim=1).flatten(1), dim=1)


def feature_attention_loss(student_features: Sequence[torch.Tensor],
                           teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over the given layers of the MSE between student and teacher attention maps."""
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError("feature_attention_loss needs matching, non-empty feature lists")
    return sum(F.mse_loss(attention_map(s), attention_map(t.detach()))
               for s, t in zip(student_features, teacher_features))

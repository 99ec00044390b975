"""Synthesis-aware fine-tuning of a quantized model (METHOD.md sections 3 and 4).

Per batch: augmentation (random-resized-crop, flip), the low-pass filter
(`synq_kernels.lowpass`; `d0=None` scales SynQ's 80 at 224 px to the images' size,
`filters.scaled_d0`), then

    L = KD(S, T) + lambda_ce * CE_easy(S, y) + lambda_cam * MSE(CAM_S, CAM_T)
        [+ fa_weight * feature attention] [+ the same on x + eps * sign(grad_x L)]

with KD on every sample, CE averaged over the easy samples only (delta = 1 - p_T(y) < tau),
and Grad-CAM maps of both models at the rectified output of the last convolution with spatial
extent above 1x1 (`find_cam_layer`: for a ResNet the last block's final ReLU, after the
residual add; the raw conv output did much worse, see there). Each
SynQ component has its own switch (`use_lowpass`, `use_cam`, `use_hard_soft_labels`; with the
last off, CE covers every sample), so an ablation is one flag each.

The teacher is a frozen copy (requires_grad False); its Grad-CAM gradient comes from
torch.autograd.grad with respect to its last-conv activation alone. Hooks are registered once
per run and removed at the end. The student stays in eval mode (BatchNorm running statistics
frozen, affine parameters trained). The first `calib_epochs` epochs only calibrate the
activation ranges (EMA), then SGD (Nesterov) with a cosine schedule trains. Data order and
augmentation come from generators seeded by (seed, epoch), and a checkpoint (student with
quantizer ranges, optimizer, scheduler, RNG states, epoch, history) is written atomically after
every epoch, so `resume=True` continues an interrupted run to the same result.

An iteration does not wait for the device: the per-call scale checks of fake_quant are off
inside it (the scales are clamped ranges) and the epoch's loss and accuracy sums stay on the
device, read once per progress-bar refresh and at the end of the epoch. There a non-finite
loss or logit, or a learned scale that left (0, inf), raises FloatingPointError before the
epoch's checkpoint is written, so the last good checkpoint survives a divergence.
The teacher and the student run as channels-last copies (`CPU_CHANNELS_LAST`,
`GPU_CHANNELS_LAST`; fake_quant keeps the layout); the returned student is contiguous. On a
CPU oneDNN's convolutions are faster so. On a GPU cuDNN's TF32 convolutions are NHWC kernels
(an NCHW model pays a layout conversion around each), and BatchNorm's backward with trained
affine parameters, which the student's BN layers have, runs one thread block per channel on
NCHW tensors but a grid-wide reduction on NHWC ones.

Under torchrun (several processes, see synq.distributed) the student is wrapped in
DistributedDataParallel and the teacher replicated. Every rank draws the same global batch of
`batch_size` indices and augmentations from the shared (seed, epoch) generator and takes its
own contiguous slice, so the union over ranks is the 1-process batch; since every loss term is
a mean over samples (the easy-sample CE divides by the global count of easy samples), DDP's
gradient average equals the 1-process gradient up to float rounding. Activation ranges are
calibrated on the global batch's min / max (reduced over ranks), so all ranks hold the same
ranges. Rank 0 alone writes the checkpoint, which does not depend on the number of processes:
a run can be resumed with another one.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import math
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, TensorDataset
from tqdm import tqdm

import synq_kernels

from . import distributed as D
from . import filters
from .evaluate import evaluate
from .losses import (ActivationCapture, cam_loss, check_tau, difficulty, easy_ce, easy_ce_sum,
                     feature_attention_loss, gradcam_map, kd_loss)
from .quant import (QUANTIZED_ACTIVATIONS, act_quantizers, check_bits, quantize_model,
                    set_calibration)
from .synth import (apply_augmentation, augmentation_params, channel_mismatch, load_synthetic,
                    model_fingerprint, progress_interval, save_atomic, seeded_generator,
                    to_device_async)

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "find_cam_layer",
           "residual_add_layers", "residual_block_layers"]

CHECKPOINT_FORMAT = 1
# Fine-tuning runs channels-last copies of the teacher and student (see the module's notes).
CPU_CHANNELS_LAST = True
GPU_CHANNELS_LAST = True
# Fine-tuning on a GPU keeps a training set of up to this size on the GPU (see finetune).
DATA_ON_GPU_BYTES = 2 << 30


@dataclass
class FinetuneConfig:
    """Everything that determines a fine-tuning run's result (checkpoints must match it)."""
    # quantization
    wbits: int = 4
    abits: int = 4
    first_last_bits: int | None = None
    symmetric_weights: bool = False
    learnable: str | None = None          # None, "lsq" or "lsq+"
    backend: str | None = None            # synq_kernels backend of fake_quant and lowpass
    # schedule
    epochs: int = 100                     # calibration epochs included
    calib_epochs: int = 4
    iters_per_epoch: int | None = 200     # None: one pass over the data per epoch
    batch_size: int = 256
    lr: float = 1e-5                      # searched in {1e-4, 1e-5, 1e-6} by the paper
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "cosine"              # or "constant"
    # input pipeline
    augment: bool = True
    crop_scale: tuple = (0.5, 1.0)
    flip: bool = True
    # SynQ component 1: low-pass filter
    use_lowpass: bool = True
    d0: float | None = None               # None: filters.scaled_d0 (80 at 224 px, 10 at 28)
    lowpass_mask: str = "gaussian"
    # SynQ component 2: CAM alignment
    use_cam: bool = True
    lambda_cam: float = 200.0
    cam_layer: str | None = None          # None: find_cam_layer (rectified last conv map)
    cam_eps: float = 1e-8
    # SynQ component 3: soft labels only for hard samples
    use_hard_soft_labels: bool = True
    tau: float = 0.5
    lambda_ce: float = 5.0
    # knowledge distillation (always on)
    kd_temperature: float = 20.0
    kd_alpha: float = 20.0
    # HAST terms (off by default)
    feature_attention: bool = False
    fa_weight: float = 1000.0
    difficulty_promotion: bool = False
    dp_eps: float = 0.01
    seed: int = 0

    def validate(self) -> "FinetuneConfig":
        check_bits("wbits", self.wbits)
        check_bits("abits", self.abits)
        if self.first_last_bits is not None:
            check_bits("first_last_bits", self.first_last_bits)
        check_tau(self.tau)
        for name in ("epochs", "calib_epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.calib_epochs > self.epochs:
            raise ValueError(f"calib_epochs ({self.calib_epochs}) must not exceed epochs "
                             f"({self.epochs})")
        if self.iters_per_epoch is not None and (not isinstance(self.iters_per_epoch, int)
                                                 or self.iters_per_epoch < 1):
            raise ValueError(f"iters_per_epoch must be None or a positive integer, got "
                             f"{self.iters_per_epoch!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        for name in ("lambda_cam", "lambda_ce", "kd_alpha", "fa_weight", "dp_eps",
                     "weight_decay", "momentum"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature must be positive, got {self.kd_temperature!r}")
        if not self.cam_eps > 0:
            raise ValueError(f"cam_eps must be positive, got {self.cam_eps!r}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, "
                             f"got {self.crop_scale!r}")
        if self.use_lowpass:
            filters.check_lowpass_args(1.0 if self.d0 is None else self.d0, self.lowpass_mask)
        if self.learnable not in (None, "lsq", "lsq+"):
            raise ValueError(f"learnable must be None, 'lsq' or 'lsq+', got {self.learnable!r}")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["crop_scale"] = list(d["crop_scale"])
        return d


@dataclass
class FinetuneResult:
    student: nn.Module
    top1: float | None          # final epoch's accuracy on eval_data (None without it)
    top5: float | None
    n: int | None
    history: list = field(default_factory=list)
    config: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# layer selection

def find_cam_layer(model: nn.Module, example: torch.Tensor) -> str:
    """Name of the Grad-CAM layer: the rectified feature map of the last convolution.

    Runs `model` on `example` and takes the last Conv2d (in execution order) whose output is
    larger than 1x1 (a 1x1 map, e.g. a conv classifier after pooling, gives an empty CAM); the
    result is the last activation module (ReLU, ReLU6, Hardswish, SiLU) that runs after it
    with an output larger than 1x1 (for a ResNet the ReLU after the last residual add, i.e.
    the last block's output); where none follows, the last BatchNorm2d that runs after it
    (torchvision's DenseNet applies its final ReLU as a function, in place: its
    `features.norm5` holds all the final features, where the last conv makes only the last
    layer's 32 new channels; pytorch-grad-cam's documentation names `features[-1]` for
    DenseNet too. GoogLeNet's pick is one branch's BN, as its conv was before); else that
    conv itself. The maps are captured before any in-place op after the layer (the models
    go on with a copy). Grad-CAM is defined on these activation maps
    (rectified in the paper's ReLU models); on the
    raw (pre-BatchNorm) conv output the CAM term hurt: at W3A3 on Fashion-MNIST, 61.6% vs
    87.2% top-1 on held-out training images (baseline 74.0%)."""
    seen = []
    handles = [m.register_forward_hook(
        lambda mod, inp, out, name=name: seen.append((name, mod, tuple(out.shape[2:]))))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or type(m) in QUANTIZED_ACTIVATIONS]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    big = [(i, name, mod) for i, (name, mod, hw) in enumerate(seen)
           if len(hw) == 2 and hw[0] * hw[1] > 1]
    convs = [(i, name) for i, name, mod in big if isinstance(mod, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d with an output larger than 1x1 "
                         f"for input {tuple(example.shape[1:])}; name a CAM layer "
                         f"(cam_layer=...)")
    last_conv, conv_name = convs[-1]
    after = [(name, mod) for i, name, mod in big if i > last_conv]
    relus = [name for name, mod in after if type(mod) in QUANTIZED_ACTIVATIONS]
    bns = [name for name, mod in after if isinstance(mod, nn.BatchNorm2d)]
    return relus[-1] if relus else bns[-1] if bns else conv_name


def residual_add_layers(model: nn.Module) -> list[str]:
    """Names of the residual-add modules (synq.models.common.Add) of `model`."""
    from .models.common import Add
    return [n for n, m in model.named_modules() if isinstance(m, Add)]


def residual_block_layers(model: nn.Module) -> list[str]:
    """Names of the residual blocks: the modules that hold a residual add
    (synq.models.common.Add) as a child. The HAST feature-attention term compares their
    outputs, i.e. after the ReLU that follows the add where the block has one (a ResNet
    block's output; a MobileNetV2 block's is the add itself), once per block however many
    adds it holds. An Add that is a child of the model itself stands for itself."""
    names = []
    for n in residual_add_layers(model):
        name = n.rpartition(".")[0] or n
        if name not in names:
            names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# data

def _as_tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (str, Path)):
        data = load_synthetic(data)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        x, y = data
    elif isinstance(data, TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
    elif isinstance(data, Dataset):
        items = [data[i] for i in range(len(data))]
        x = torch.stack([torch.as_tensor(a) for a, _ in items])
        y = torch.as_tensor([int(b) for _, b in items])
    else:
        raise TypeError(f"train_data must be a synthetic-data file, a Dataset of (x, y) or an "
                        f"(x, y) pair of tensors, got {type(data).__name__}")
    if x.dim() != 4 or y.dim() != 1 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"train_data must hold N x C x H x W images and N labels, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"train_data's labels must be class indices (integers), got {y.dtype}")
    if y.is_floating_point() and not torch.equal(y, y.round()):
        odd = y[y != y.round()][0].item()
        raise ValueError(f"train_data's labels must be class indices (integers), got {y.dtype} "
                         f"values such as {odd!r}")
    if int(y.min()) < 0:
        raise ValueError(f"train_data's labels must be class indices >= 0, got {int(y.min())}")
    return x.float(), y.long()


def _data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(str((tuple(x.shape), tuple(y.shape))).encode())
    h.update(x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(y.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _epoch_indices(n: int, iters: int, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
    """`iters` batches drawn without replacement from successive permutations of range(n)."""
    need = iters * batch
    perms = [torch.randperm(n, generator=gen) for _ in range(math.ceil(need / n))]
    order = torch.cat(perms)[:need]
    return [order[i * batch:(i + 1) * batch] for i in range(iters)]


# ---------------------------------------------------------------------------------------------
# the loop

def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU the writer saw; a resume on a machine with fewer GPUs (another
        # number of processes) restores the ones it has
        for i, st in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(st, i)


# DDP's switch for not broadcasting buffers at each forward: renamed in torch 2.14 (the old
# name warns there), and the project supports torch 2.11 too.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


def _easy_ce(logits, y, easy):
    """easy_ce of the global batch: under several processes the local CE sum is divided by
    the global number of easy samples (times the world size, which DDP's gradient average
    divides out again), so the result equals the 1-process mean over the easy samples."""
    if not D.is_distributed():
        return easy_ce(logits, y, easy)
    n_easy = D.all_reduce_sum(easy.sum()).clamp(min=1)
    return easy_ce_sum(logits, y, easy) * D.world_size() / n_easy


class _Step:
    """The losses of one batch; holds the hooks (registered once per run). `forward` is the
    student as trained (its DDP wrapper under several processes)."""

    def __init__(self, cfg: FinetuneConfig, teacher, student, cam_layer, fa_layers, stack,
                 forward=None):
        self.cfg, self.teacher, self.student = cfg, teacher, student
        self.forward = forward or student
        self.cam_layer, self.fa_layers = cam_layer, fa_layers
        self.t_cam = self.s_cam = self.t_fa = self.s_fa = None
        if cfg.use_cam:
            # (copies: the layer's output may be changed in place after it, see find_cam_layer)
            self.t_cam = stack.enter_context(ActivationCapture(teacher, [cam_layer], True,
                                                               copy_out=True))
            self.s_cam = stack.enter_context(ActivationCapture(student, [cam_layer],
                                                               copy_out=True))
        if cfg.feature_attention:
            self.t_fa = stack.enter_context(ActivationCapture(teacher, fa_layers))
            self.s_fa = stack.enter_context(ActivationCapture(student, fa_layers))

    def losses(self, x, y, student):
        cfg = self.cfg
        parts = {}
        with torch.set_grad_enabled(cfg.use_cam):
            t_logits = self.teacher(x)
        if cfg.use_cam:
            a_t = self.t_cam.outputs[self.cam_layer]
            score = t_logits.gather(1, t_logits.argmax(1, keepdim=True)).sum()
            (g_t,) = torch.autograd.grad(score, a_t)
            cam_t = gradcam_map(a_t.detach(), g_t, x.shape[2:], cfg.cam_eps)
        t_logits = t_logits.detach()

        s_logits = student(x)
        kd = kd_loss(s_logits, t_logits, cfg.kd_temperature, cfg.kd_alpha)
        if cfg.use_hard_soft_labels:
            easy = difficulty(t_logits, y) < cfg.tau
            ce = _easy_ce(s_logits, y, easy)
            parts["easy"] = easy.float().mean().detach()
        else:
            ce = F.cross_entropy(s_logits, y)
        total = kd + cfg.lambda_ce * ce
        parts.update(kd=kd.detach(), ce=ce.detach())
        if cfg.use_cam:
            a_s = self.s_cam.outputs[self.cam_layer]
            score = s_logits.gather(1, s_logits.argmax(1, keepdim=True)).sum()
            (g_s,) = torch.autograd.grad(score, a_s, retain_graph=True)
            cam = cam_loss(gradcam_map(a_s, g_s, x.shape[2:], cfg.cam_eps), cam_t)
            total = total + cfg.lambda_cam * cam
            parts["cam"] = cam.detach()
        if cfg.feature_attention:
            fa = feature_attention_loss([self.s_fa.outputs[n] for n in self.fa_layers],
                                        [self.t_fa.outputs[n] for n in self.fa_layers])
            total = total + cfg.fa_weight * fa
            parts["fa"] = fa.detach()
        return total, s_logits.detach(), parts

    def __call__(self, x, y):
        if not self.cfg.difficulty_promotion:
            return self.losses(x, y, self.forward)
        # HAST difficulty promotion: the same losses again on x + eps * sign(grad_x L).
        # DDP allows one forward per backward: the second pass runs the bare student; its
        # gradient still reaches DDP's hooks, which fire once per parameter per backward.
        x = x.detach().requires_grad_(True)
        total, logits, parts = self.losses(x, y, self.forward)
        (gx,) = torch.autograd.grad(total, x, retain_graph=True)
        x2 = (x + self.cfg.dp_eps * gx.sign()).detach()
        total2, _, _ = self.losses(x2, y, self.student)
        parts["promoted"] = total2.detach()
        return total + total2, logits, parts


class _EpochStats:
    """Running sums of one epoch kept on the device (loss parts weighted by batch size in
    float64, correct predictions, samples with a non-finite logit), so that an iteration adds
    to them without waiting for the device; `read` brings them to the host in one copy."""

    def __init__(self, device):
        self.sums: dict[str, torch.Tensor] = {}
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.correct, self.nonfinite, self.seen = zero, zero, 0

    def add(self, parts: dict, logits: torch.Tensor, y: torch.Tensor) -> None:
        n = len(y)
        for k, v in parts.items():
            t = v.detach().double() * n
            self.sums[k] = self.sums.get(k, 0.0) + t
        self.correct = self.correct + (logits.argmax(1) == y).sum()
        self.nonfinite = self.nonfinite + (~torch.isfinite(logits)).any(1).sum()
        self.seen += n

    def read(self, reduce: bool = False) -> dict:
        """{"correct", "seen", "nonfinite", "sums": {loss part: sum}} over this process's
        batches (over all processes with `reduce`, which every rank must call)."""
        keys = list(self.sums)  # the same order on every rank: each adds the same parts
        seen = torch.full_like(self.correct, self.seen)
        flat = torch.stack([self.correct, seen, self.nonfinite] + [self.sums[k] for k in keys])
        if reduce:
            flat = D.all_reduce_sum(flat)
        values = flat.tolist()
        return {"correct": int(values[0]), "seen": int(values[1]),
                "nonfinite": int(values[2]), "sums": dict(zip(keys, values[3:]))}


def _postfix(totals: dict) -> dict:
    seen = max(totals["seen"], 1)
    post = {"acc": f"{100.0 * totals['correct'] / seen:.1f}"}
    if "loss" in totals["sums"]:
        post["loss"] = f"{totals['sums']['loss'] / seen:.4f}"
    return post


def _check_finite(totals: dict, epoch: int, cfg, calibrating: bool, student) -> None:
    """FloatingPointError, before the epoch's checkpoint is written, when the epoch produced
    a non-finite loss or logit, or a learned quantizer scale left (0, inf)."""
    nonfinite = totals["nonfinite"]
    where = f"epoch {epoch + 1}/{cfg.epochs}"
    if calibrating and nonfinite:
        raise FloatingPointError(
            f"calibration ({where}): the quantized model gave non-finite logits for "
            f"{nonfinite} sample(s); check the teacher and the training data for inf / NaN")
    loss = totals["sums"].get("loss")
    if loss is not None and (nonfinite or not math.isfinite(loss)):
        raise FloatingPointError(
            f"fine-tuning diverged in {where}: the loss sum is {loss} and {nonfinite} "
            f"sample(s) had non-finite logits; the previous epoch's checkpoint is kept. "
            f"Try a lower lr (now {cfg.lr}) or smaller loss weights")
    scales = [(n, p) for n, p in student.named_parameters()
              if "quantizer" in n and n.rsplit(".", 1)[-1] == "scale"]
    if scales and not calibrating:
        low = torch.stack([p.detach().min().float() for _, p in scales])
        if not bool(torch.isfinite(low).all() & (low > 0).all()):
            i = int((~(torch.isfinite(low) & (low > 0))).nonzero()[0])
            raise FloatingPointError(
                f"fine-tuning diverged in {where}: the learned scale {scales[i][0]} reached "
                f"{float(low[i])} (it must stay positive and finite); try a lower lr "
                f"(now {cfg.lr})")


def _evaluate_frozen(student, quantizers, eval_data, device) -> dict:
    """evaluate without calibrating on the test set: a test during the calibration epochs
    must neither move the ranges nor (sharded over ranks) reduce a different number of
    batches on each rank."""
    flags = [q.calibrating for q in quantizers]
    for q in quantizers:
        q.calibrating = False
    try:
        return evaluate(student, eval_data, device)
    finally:
        for q, f in zip(quantizers, flags):
            q.calibrating = f


def finetune(teacher: nn.Module, train_data, config: FinetuneConfig | None = None, *,
             eval_data=None, checkpoint=None, resume: bool = False, device=None,
             eval_every: int = 0, progress: bool = True,
             on_epoch_end: Callable[[int, dict], None] | None = None,
             **overrides) -> FinetuneResult:
    """Quantize `teacher` and fine-tune the quantized copy on `train_data`.

    Args:
        teacher: the pre-trained float model (not modified; a frozen copy is used).
        train_data: a `synthesize` output file, a Dataset of (x, y), or an (x, y) pair of
            tensors (real images give the ceiling of the method).
        config: a FinetuneConfig; keyword `overrides` replace its fields.
        eval_data: test set (DataLoader, Dataset or (x, y)); its accuracy after the final epoch
            is the result (`eval_every` > 0 also evaluates every that many epochs, for the
            curve in the history; never used to pick an epoch).
        checkpoint: file written atomically after every epoch; with `resume=True` an existing
            one (same config, teacher and data, else ValueError) is continued.
        on_epoch_end: called with (epoch index, that epoch's history entry) after the checkpoint
            is written.

    Under several processes every rank calls it with the same arguments (`batch_size` is the
    global batch and must divide by the number of processes); each returns the same result.

    Returns a FinetuneResult (student in eval mode, final top1 / top5 / n, per-epoch history).
    """
    cfg = dataclasses.replace(config or FinetuneConfig(), **overrides).validate()
    local = D.local_slice(cfg.batch_size)  # this rank's share of every global batch
    if cfg.use_lowpass and not filters.has_lowpass():
        raise RuntimeError("use_lowpass=True needs synq_kernels.lowpass, which the installed "
                           "synq_kernels lacks; update it or set use_lowpass=False")
    x_all, y_all = _as_tensors(train_data)
    if device is None:
        p = next(teacher.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)

    teacher = copy.deepcopy(teacher).to(device).eval().requires_grad_(False)
    why = channel_mismatch(teacher, tuple(x_all.shape[1:]))
    if why:
        raise ValueError(f"train_data: {why}")
    with torch.no_grad():
        classes = teacher(x_all[:1].to(device)).shape[-1]
    if int(y_all.max()) >= classes:
        raise ValueError(f"train_data's labels must be class indices below {classes} (the "
                         f"model's outputs), got {int(y_all.max())}")
    channels_last = CPU_CHANNELS_LAST if device.type == "cpu" else GPU_CHANNELS_LAST
    if channels_last:
        # faster convolutions on both (and BN's backward on a GPU, see the module's notes);
        # the student (a quantized copy) inherits the layout and is returned contiguous
        teacher = teacher.to(memory_format=torch.channels_last)
    student = quantize_model(teacher, cfg.wbits, cfg.abits, first_last_bits=cfg.first_last_bits,
                             symmetric_weights=cfg.symmetric_weights, learnable=cfg.learnable,
                             backend=cfg.backend).requires_grad_(True).eval()

    cam_layer = None
    if cfg.use_cam:
        modules = dict(teacher.named_modules())
        if cfg.cam_layer is not None:
            if cfg.cam_layer not in modules or cfg.cam_layer == "":
                convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)][-3:]
                raise ValueError(f"cam_layer {cfg.cam_layer!r} is not a module of "
                                 f"{type(teacher).__name__} (its last convolutions: "
                                 f"{', '.join(convs)})")
            cam_layer = cfg.cam_layer
        else:
            cam_layer = find_cam_layer(teacher, x_all[:1].to(device))
    fa_layers = residual_block_layers(teacher) if cfg.feature_attention else []
    if cfg.feature_attention and not fa_layers:
        raise ValueError("feature_attention needs residual-add modules (synq.models.common.Add)"
                         f" in the model; {type(teacher).__name__} has none")

    n = len(y_all)
    iters = cfg.iters_per_epoch or math.ceil(n / cfg.batch_size)
    train_iters = (cfg.epochs - cfg.calib_epochs) * iters
    decay, no_decay = [], []
    for name, p in student.named_parameters():
        (no_decay if "quantizer" in name else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                          momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(train_iters, 1))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    meta = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(),
            "teacher": model_fingerprint(teacher), "data": _data_fingerprint(x_all, y_all)}
    history, start_epoch = [], 0
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        for key in ("format", "config", "teacher", "data"):
            if ckpt["meta"].get(key) != meta[key]:
                raise ValueError(f"checkpoint {ckpt_path} belongs to another run (its {key} "
                                 f"differs); delete it, or start without resuming "
                                 f"(resume=False; on the command line, no --resume)")
        student.load_state_dict(ckpt["student"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])  # rank 0's, written whatever the number of processes
        history, start_epoch = ckpt["history"], ckpt["epoch"]
    else:
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)

    # On a GPU a data set of up to DATA_ON_GPU_BYTES lives there for the run: a batch is then
    # gathered on the GPU, instead of being copied from pageable host memory at every step
    # (a copy the host waits for; two per step, found by benchmarks/gpu_profile.py).
    src_x, src_y = x_all, y_all
    if (torch.device(device).type == "cuda"
            and x_all.numel() * x_all.element_size() <= DATA_ON_GPU_BYTES):
        src_x, src_y = x_all.to(device), y_all.to(device)

    d0 = cfg.d0 if cfg.d0 is not None else filters.scaled_d0(x_all.shape)

    def batches(epoch):
        # Every rank draws the whole global batch (indices and augmentation) from the same
        # generator, then keeps its slice: the union over ranks is the 1-process batch.
        gen = seeded_generator(cfg.seed, 3, epoch)
        for idx in _epoch_indices(n, iters, cfg.batch_size, gen):
            idx = idx[local]
            if src_x.device != idx.device:
                idx = to_device_async(idx, src_x.device)
            x, y = to_device_async(src_x[idx], device), to_device_async(src_y[idx], device)
            if cfg.augment:
                theta = augmentation_params(cfg.batch_size, gen, cfg.crop_scale, cfg.flip)
                x = apply_augmentation(x, theta[local])
            if cfg.use_lowpass:
                x = filters.lowpass(x, d0, cfg.lowpass_mask, cfg.backend)
            yield x, y

    quantizers = list(act_quantizers(student).values())
    forward = student
    if D.is_distributed():
        for q in quantizers:
            q.sync_ranks = True
        # Buffers (frozen BN statistics, activation ranges) are kept identical on all ranks
        # by construction, so DDP need not broadcast them at every forward.
        forward = DistributedDataParallel(
            student, device_ids=[device] if device.type == "cuda" else None, **_NO_BUFFER_SYNC)
    with ExitStack() as stack:
        step = _Step(cfg, teacher, student, cam_layer, fa_layers, stack, forward)
        for epoch in range(start_epoch, cfg.epochs):
            calibrating = epoch < cfg.calib_epochs
            for q in quantizers:
                q.calibrating = calibrating
            t0 = time.time()
            stats = _EpochStats(device)
            bar = tqdm(batches(epoch), total=iters, disable=not progress or not D.is_main(),
                       mininterval=progress_interval(),
                       dynamic_ncols=True,
                       desc=f"{'calibrate' if calibrating else 'fine-tune'} "
                            f"{epoch + 1}/{cfg.epochs}")
            shown = time.monotonic()
            for x, y in bar:
                # The scales fed to fake_quant are positive by construction (clamped ranges);
                # their per-call checks would make a GPU wait twice per layer. Non-finite
                # values are caught once per epoch below instead, before the checkpoint.
                with synq_kernels.value_checks(False):
                    if calibrating:
                        with torch.no_grad():
                            logits = student(x)
                        parts = {}
                    else:
                        loss, logits, parts = step(x, y)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
                        parts["loss"] = loss.detach()
                stats.add(parts, logits, y)
                if not bar.disable and time.monotonic() - shown >= bar.mininterval:
                    bar.set_postfix(_postfix(stats.read()), refresh=False)  # one read
                    shown = time.monotonic()
            bar.close()
            totals = stats.read(reduce=D.is_distributed())  # the global batches' statistics
            _check_finite(totals, epoch, cfg, calibrating, student)
            correct, seen, sums = totals["correct"], totals["seen"], totals["sums"]
            if epoch == cfg.calib_epochs - 1:
                set_calibration(student, False)  # freeze; learnable ranges start from here
            entry = {"epoch": epoch + 1, "phase": "calibrate" if calibrating else "train",
                     "train_acc": 100.0 * correct / max(seen, 1),
                     "lr": opt.param_groups[0]["lr"], "seconds": time.time() - t0}
            entry.update({k: v / max(seen, 1) for k, v in sums.items()})
            if eval_data is not None and eval_every and (epoch + 1) % eval_every == 0 \
                    and epoch + 1 < cfg.epochs:
                entry["test"] = _evaluate_frozen(student, quantizers, eval_data, device)
            history.append(entry)
            if ckpt_path is not None and D.is_main():
                save_atomic({"meta": meta, "epoch": epoch + 1, "student": student.state_dict(),
                             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                             "rng": _rng_state(), "history": history}, ckpt_path)
            D.barrier()  # the checkpoint is complete before any rank goes on
            if on_epoch_end is not None:
                on_epoch_end(epoch, entry)
    for q in quantizers:
        q.calibrating = False
        q.sync_ranks = False  # the returned model runs on its own, e.g. on rank 0 alone
    student.eval().to(memory_format=torch.contiguous_format)
    top1 = top5 = n_eval = None
    if eval_data is not None:
        res = evaluate(student, eval_data, device)
        top1, top5, n_eval = res["top1"], res["top5"], res["n"]
        if history:
            history[-1]["test"] = res
    return FinetuneResult(student, top1, top5, n_eval, history, cfg.to_dict())

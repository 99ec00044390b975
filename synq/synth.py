"""Synthetic calibration data by BatchNorm-statistics matching (METHOD.md section 1).

The pixels themselves are optimized (no generator network): each batch starts from N(0, 1)
noise with uniformly random labels, and Adam (lr 0.5, ReduceLROnPlateau patience 50, min lr
1e-4) minimizes BNS + beta * focal CE, optionally with crop/flip augmentation and TexQ-style
class-centre statistics (L-BNS).

`synthesize` writes one file, `torch.save({"images", "labels", "meta"})`, rewritten
atomically after every finished batch. Each batch draws its noise, labels and augmentation
from a generator seeded by (seed, batch index) alone, so an interrupted run resumed from the
file gives exactly the images of an uninterrupted one. `load_synthetic` reads the file back as
a TensorDataset for fine-tuning.

Speed: the BN statistics of every layer come from `synq_kernels.channel_stats` (one pass over
the data forward and backward on the CPU); on a CPU each frozen BatchNorm2d runs fused with the
statistics of its input, and with the ReLU that follows it where there is one
(`synq_kernels.batch_norm_stats`, through `synq.losses.BNStats`; same bits as unfused), and
the model runs as a channels-last copy (`CPU_CHANNELS_LAST`), where oneDNN's convolutions are
faster; the caller's model is untouched.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from . import distributed as D
from .losses import BNStats, batch_stats, bns_loss, focal_ce, lbns_loss

__all__ = ["SynthConfig", "synthesize", "load_synthetic", "augment_batch", "augmentation_params",
           "apply_augmentation", "seeded_generator", "model_fingerprint", "save_atomic",
           "to_device_async"]

FORMAT_VERSION = 1


@dataclass
class SynthConfig:
    """Budget and loss settings of BN-statistics synthesis (defaults: the paper's, except
    keep_best, which the paper does not have: with its 1,000 steps and learning-rate decay the
    best and the last iterate nearly coincide; benchmarks/results/synth/keep_best_*.md)."""
    num_images: int = 5120
    batch_size: int = 256
    steps: int = 1000            # Adam steps per batch
    lr: float = 0.5
    beta: float = 0.1            # weight of the focal CE
    gamma: float = 0.5           # focal exponent
    patience: int = 50           # ReduceLROnPlateau
    lr_factor: float = 0.1
    min_lr: float = 1e-4
    augment: bool = False        # random-resized-crop + flip, with probability aug_prob a step
    aug_prob: float = 0.5
    crop_scale: tuple = (0.4, 1.0)
    flip: bool = True
    lbns: bool = False           # TexQ class centres
    centre_steps: int = 1500
    centre_ce_weight: float = 5.0
    centre_early_weight: float = 0.2
    centre_late_weight: float = 1.1
    lbns_bns_weight: float = 0.4
    lbns_ce_weight: float = 1.0
    lbns_weight: float = 0.02
    keep_best: bool = True       # each batch's lowest-loss iterate, not its last (see _optimize)
    seed: int = 0

    def validate(self) -> "SynthConfig":
        for name in ("num_images", "batch_size", "steps", "centre_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "min_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("beta", "gamma", "lbns_bns_weight", "lbns_ce_weight", "lbns_weight",
                     "centre_ce_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 < self.lr_factor < 1.0:
            raise ValueError(f"lr_factor must lie in (0, 1), got {self.lr_factor!r}")
        if not 0.0 <= self.aug_prob <= 1.0:
            raise ValueError(f"aug_prob must lie in [0, 1], got {self.aug_prob!r}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, "
                             f"got {self.crop_scale!r}")
        return self


# ---------------------------------------------------------------------------------------------
# helpers shared with fine-tuning

def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of non-negative ints (e.g. (seed, batch index)),
    independent of any other random state."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def augment_batch(x: torch.Tensor, gen: torch.Generator, crop_scale=(0.5, 1.0),
                  flip: bool = True) -> torch.Tensor:
    """Random-resized-crop (area fraction in `crop_scale`, aspect ratio 3/4 to 4/3) and
    horizontal flip, drawn per sample from `gen`, as one differentiable grid_sample."""
    return apply_augmentation(x, augmentation_params(x.shape[0], gen, crop_scale, flip))


def augmentation_params(b: int, gen: torch.Generator, crop_scale=(0.5, 1.0),
                        flip: bool = True) -> torch.Tensor:
    """The b x 2 x 3 affine maps of `augment_batch`, drawn from `gen`. Drawing them for a whole
    global batch and slicing lets each rank augment only its share, identically."""
    area = torch.empty(b).uniform_(crop_scale[0], crop_scale[1], generator=gen)
    log_r = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = torch.exp(log_r)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    sign = torch.ones(b)
    if flip:
        sign = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    return theta


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`. A host tensor goes to a GPU through pinned memory without blocking:
    a copy from pageable memory makes the host wait for the GPU (twice per fine-tuning step,
    for the batch indices and the augmentation, in benchmarks/gpu_profile.py's report)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def apply_augmentation(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample each image of `x` through its affine map in `theta` (augmentation_params)."""
    theta = to_device_async(theta, x.device).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def progress_interval() -> float:
    """tqdm refresh interval: 1 s on a terminal, 30 s into a log file (keeps logs small)."""
    return 1.0 if sys.stderr.isatty() else 30.0


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of a model's state dict: names, shapes and values."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_atomic(obj, path) -> None:
    """torch.save to a temporary file beside `path`, then os.replace (never a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@contextmanager
def frozen(model: nn.Module):
    """Eval mode and requires_grad False on every parameter, both restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# synthesis

# Synthesis on a CPU runs a channels-last copy of the model (see synthesize).
CPU_CHANNELS_LAST = True

def _optimize(model, stats, x, y, steps, cfg, gen, loss_fn, bar, desc):
    """Adam on the pixels x (in place). With cfg.keep_best, x ends as the iterate of lowest
    loss rather than the last one: at lr 0.5 Adam's loss has spikes, and a budget too short
    for ReduceLROnPlateau to lower the rate (patience 50) can end on one; measured on the
    bundled ResNet-20 at 150 steps, the last iterate's BNS ranged over 0.0017-0.0145 across
    seeds. Returns the loss parts of the iterate kept."""
    opt = torch.optim.Adam([x], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.lr_factor,
                                                       patience=cfg.patience, min_lr=cfg.min_lr)
    parts, best, best_x, best_parts = {}, math.inf, None, {}
    for step in range(steps):
        inp = x
        if cfg.augment and float(torch.rand((), generator=gen)) < cfg.aug_prob:
            inp = augment_batch(x, gen, cfg.crop_scale, cfg.flip)
        logits = model(inp)
        loss, parts = loss_fn(logits, stats, y)
        value = float(loss.detach())  # the loss of x as it is before this step's update
        if cfg.keep_best and value < best:
            best, best_x, best_parts = value, x.detach().clone(), parts
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step(value)
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix_str(f"{desc} loss {value:.4f} " +
                                    " ".join(f"{k} {float(v):.4f}" for k, v in parts.items()))
    if best_x is not None:
        with torch.no_grad():
            x.copy_(best_x)
        parts = best_parts
    return {k: float(v) for k, v in parts.items()}


def _class_centres(model, stats, cfg, image_shape, num_classes, device, bar):
    """One image per class (5 * CE + BNS with early / late layer weights); returns the
    images and, for the later half of the BN layers, their per-class channel statistics."""
    n_bn = len(stats.layers)
    half = n_bn // 2
    weights = [cfg.centre_early_weight] * half + [cfg.centre_late_weight] * (n_bn - half)
    gen = seeded_generator(cfg.seed, 2)
    x = torch.randn(num_classes, *image_shape, generator=gen).to(device).requires_grad_(True)
    y = torch.arange(num_classes, device=device)

    def loss_fn(logits, stats, y):
        bns = bns_loss(stats.inputs, stats.layers, weights, stats.stats)
        ce = F.cross_entropy(logits, y)
        return cfg.centre_ce_weight * ce + bns, {"bns": bns.detach(), "ce": ce.detach()}

    _optimize(model, stats, x, y, cfg.centre_steps, cfg, gen, loss_fn, bar, "centres")
    with torch.no_grad():
        model(x.detach())
        means, vars_ = zip(*(batch_stats(t, per_sample=True) for t in stats.inputs[half:]))
    return x.detach().cpu(), [m.cpu() for m in means], [v.cpu() for v in vars_]


def _load(path) -> dict:
    """A synthesis file; memory-mapped on ranks other than 0, which only read it."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=not D.is_main())


def _config_dict(cfg: SynthConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["crop_scale"] = list(d["crop_scale"])
    return d


def channel_mismatch(model: nn.Module, image_shape) -> str | None:
    """Why images of `image_shape` (C, H, W) cannot enter the model's first convolution, or
    None (also for a model without one)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and len(image_shape) == 3 and image_shape[0] != first.in_channels:
        return (f"the image shape {','.join(map(str, image_shape))} has {image_shape[0]} "
                f"channel(s), but the model's first convolution takes {first.in_channels}")
    return None


def synthesize(model: nn.Module, out_path, image_shape, num_classes: int | None = None,
               config: SynthConfig | None = None, device=None, progress: bool = True,
               on_batch_end: Callable[[int], None] | None = None, **overrides) -> dict:
    """Synthesize `config.num_images` images for `model` (a BatchNorm CNN) into `out_path`.

    Args:
        model: the pre-trained float model; left as it was (mode and requires_grad restored).
        out_path: the output file; if it exists and was written by the same configuration and
            model, the run continues after its last finished batch (a complete file is
            returned as is). A file from another configuration or model is an error.
        image_shape: (C, H, W) of one image.
        num_classes: number of classes; None reads it from the model's output.
        config: a SynthConfig; keyword `overrides` replace its fields.
        on_batch_end: called with each finished batch's index after the file is written
            (on every rank, under several processes).

    Returns the saved dict {"images": float32 N x C x H x W, "labels": int64 N, "meta": {...}}
    (on every rank; memory-mapped from the file on ranks other than 0).
    """
    cfg = dataclasses.replace(config or SynthConfig(), **overrides).validate()
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
    why = channel_mismatch(model, image_shape)
    if why:
        raise ValueError(why)
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    out_path = Path(out_path)
    if device.type == "cpu" and CPU_CHANNELS_LAST:
        # oneDNN's convolutions (forward and input gradient) run faster on channels-last
        # tensors on the CPU; a copy keeps the caller's model as it was. The results are the
        # same function of the model (float rounding aside).
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    with frozen(model), BNStats(model) as stats:
        if num_classes is None:
            with torch.no_grad():
                num_classes = int(model(torch.zeros(2, *image_shape, device=device)).shape[1])
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        n_batches = math.ceil(cfg.num_images / cfg.batch_size)
        meta = {"format": FORMAT_VERSION, "config": _config_dict(cfg),
                "image_shape": list(image_shape), "num_classes": num_classes,
                "model": model_fingerprint(model), "model_class": type(model).__name__,
                "num_batches": n_batches, "batches_done": 0, "complete": False,
                "batch_losses": [], "seconds": 0.0, "torch": torch.__version__}
        images, labels, centres = [], [], None
        if out_path.exists():
            saved = _load(out_path)
            old = saved.get("meta", {})
            for key in ("format", "config", "image_shape", "num_classes", "model"):
                if old.get(key) != meta[key]:
                    raise ValueError(
                        f"{out_path} was written with another {key} ({old.get(key)!r}, now "
                        f"{meta[key]!r}); delete it or choose another output path")
            if old.get("complete"):
                return saved
            meta.update({k: old[k] for k in ("batches_done", "batch_losses", "seconds")})
            n_done = meta["batches_done"] * cfg.batch_size
            images, labels = [saved["images"][:n_done]], [saved["labels"][:n_done]]
            centres = saved.get("centres")

        start = meta["batches_done"]
        # Several processes: batch b is made by rank (b - start) % world. A round of `world`
        # consecutive batches is gathered on rank 0, which appends it to the file in batch
        # order; since each batch depends only on (seed, b), the file equals a 1-process one.
        world, me = D.world_size(), D.rank()
        total_steps = len(range(start + me, n_batches, world)) * cfg.steps
        if cfg.lbns and centres is None and D.is_main():
            total_steps += cfg.centre_steps
        bar = tqdm(total=total_steps, desc=f"synthesis {out_path.name}",
                   disable=not progress or not D.is_main(),
                   mininterval=progress_interval(), dynamic_ncols=True)
        try:
            t0 = time.time()
            late = list(range(len(stats.layers) // 2, len(stats.layers)))
            if cfg.lbns and centres is None:
                if D.is_main():  # once, then shared: every rank must match the same centres
                    c_img, c_mean, c_var = _class_centres(model, stats, cfg, image_shape,
                                                          num_classes, device, bar)
                    centres = {"images": c_img, "means": c_mean, "vars": c_var}
                centres = D.broadcast_object(centres)
            if cfg.lbns:
                c_mean = [m.to(device) for m in centres["means"]]
                c_var = [v.to(device) for v in centres["vars"]]

            def loss_fn(logits, stats, y):
                bns = bns_loss(stats.inputs, stats.layers, stats=stats.stats)
                ce = focal_ce(logits, y, cfg.gamma)
                if not cfg.lbns:
                    return bns + cfg.beta * ce, {"bns": bns.detach(), "ce": ce.detach()}
                lb = lbns_loss([stats.inputs[i] for i in late], y, c_mean, c_var)
                loss = cfg.lbns_bns_weight * bns + cfg.lbns_ce_weight * ce + cfg.lbns_weight * lb
                return loss, {"bns": bns.detach(), "ce": ce.detach(), "lbns": lb.detach()}

            for first in range(start, n_batches, world):
                b = first + me
                mine = None
                if b < n_batches:
                    n = min(cfg.batch_size, cfg.num_images - b * cfg.batch_size)
                    gen = seeded_generator(cfg.seed, 1, b)
                    x = torch.randn(n, *image_shape, generator=gen).to(device)
                    x.requires_grad_(True)
                    y = torch.randint(num_classes, (n,), generator=gen).to(device)
                    parts = _optimize(model, stats, x, y, cfg.steps, cfg, gen, loss_fn, bar,
                                      f"batch {b + 1}/{n_batches}")
                    mine = (x.detach().cpu(), y.cpu(), parts)
                done = min(first + world, n_batches)
                if D.is_main():
                    for got in D.gather_objects(mine):
                        if got is not None:
                            images.append(got[0])
                            labels.append(got[1])
                            meta["batch_losses"].append(got[2])
                    meta["batches_done"] = done
                    meta["complete"] = done == n_batches
                    meta["seconds"] += time.time() - t0
                    t0 = time.time()
                    saved = {"images": torch.cat(images), "labels": torch.cat(labels),
                             "meta": dict(meta)}
                    if centres is not None:
                        saved["centres"] = centres
                    save_atomic(saved, out_path)
                    images, labels = [saved["images"]], [saved["labels"]]
                else:
                    D.gather_objects(mine)
                D.barrier()  # the file holds this round before any rank reports it done
                if on_batch_end is not None:
                    for i in range(first, done):
                        on_batch_end(i)
        finally:
            bar.close()
    if not D.is_main():  # the others read rank 0's file (memory-mapped: no copy per rank)
        saved = _load(out_path)
    return saved


def load_synthetic(path, require_complete: bool = True) -> TensorDataset:
    """The images and labels of a `synthesize` output file as a TensorDataset."""
    # Memory-mapped (torch.save's zip format only): the ranks of one machine then share one
    # copy of the images in the page cache.
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False,
                           mmap=zipfile.is_zipfile(path))
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file: say what was expected
        raise ValueError(f"{path} is not a synthetic-data file written by `synq synthesize` "
                         f"(torch.load failed: {type(e).__name__}: {e})") from e
    if not isinstance(saved, dict) or "images" not in saved or "labels" not in saved:
        raise ValueError(f"{path} is not a synthetic-data file (expected a dict with images, "
                         f"labels and meta)")
    meta = saved.get("meta", {})
    if require_complete and not meta.get("complete", True):
        raise ValueError(f"{path} is incomplete ({meta.get('batches_done')} of "
                         f"{meta.get('num_batches')} batches); rerun synthesize to finish it")
    images = saved["images"]
    if not images.is_floating_point():
        raise ValueError(f"{path}: images must be a floating tensor (normalized model input), "
                         f"got {images.dtype}")
    return TensorDataset(images.float(), saved["labels"].long())

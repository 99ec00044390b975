"""End to end: images per second of SynQ fine-tuning, synq kernels against the same loop on
the reference ops (plain PyTorch, the way the public SynQ code runs).

One fine-tuning iteration as `synq.finetune` runs it: augmentation, the low-pass filter,
teacher forward and backward (Grad-CAM), student (W4A4 fake-quantized) forward and backward,
KD + easy-only CE + CAM losses, SGD step. Each run is 1 calibration epoch, 1 warm-up epoch
(kernel compilation, allocator) and 1 timed epoch of `iters` iterations; the rate is that
last epoch's. Models have random weights with random BatchNorm statistics (speed does not
depend on the values); data are random images.

    python -m benchmarks.bench_train [--quick] [--device cpu|cuda] [--out DIR]
"""
from __future__ import annotations


import torch
from torch import nn

from synq.finetune import FinetuneConfig, finetune
from synq.models import resnet18, resnet20

from .common import bench_main, markdown_table, write_results

# (name, builder, image shape, batch, iterations): the sizes; --quick shrinks them
CASES = [("resnet20", lambda: resnet20(10, 3), (3, 32, 32), 256, 4),
         ("resnet18", lambda: resnet18(num_classes=1000), (3, 224, 224), 64, 3)]
QUICK_CPU = [("resnet20", lambda: resnet20(10, 3), (3, 32, 32), 64, 3),
             ("resnet18", lambda: resnet18(num_classes=100), (3, 64, 64), 16, 2)]


def random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def images_per_second(model, shape, batch, iters, backend, device) -> float:
    g = torch.Generator().manual_seed(0)
    n = batch * iters
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    cfg = FinetuneConfig(wbits=4, abits=4, epochs=3, calib_epochs=1, iters_per_epoch=iters,
                         batch_size=batch, d0=80.0 * shape[-1] / 224, backend=backend)
    res = finetune(model, (x, y), cfg, device=device, progress=False)
    return batch * iters / res.history[-1]["seconds"]


def run(quick: bool = False, device: str = "cpu", out_dir: str = "benchmarks/results"):
    cases = QUICK_CPU if (quick and device == "cpu") else CASES
    # rounds alternate the two loops, each keeps its fastest: a shared CPU is noisy, and on a
    # GPU two single-round runs disagreed (H200: 1.04x then 1.96x for ResNet-20), at about
    # 3 s per round
    rounds = 2 if (quick and device == "cpu") else 3
    rows = []
    for name, build, shape, batch, iters in cases:
        model = random_bn(build()).to(device)
        rates = {"reference": [], None: []}
        for _ in range(rounds):
            for backend in rates:
                rates[backend].append(images_per_second(model, shape, batch, iters, backend,
                                                        device))
        ref, fast = max(rates["reference"]), max(rates[None])
        rows.append({"model": name, "image": "x".join(map(str, shape)), "batch": batch,
                     "iters timed": iters, "reference img/s": ref, "synq img/s": fast,
                     "speedup": fast / ref,
                     "rounds (ref / synq)": " / ".join(
                         f"{r:.3g}" for r in rates["reference"] + rates[None])})
        print(markdown_table(rows[-1:]), flush=True)
    notes = ("W4A4 SynQ fine-tuning iteration (augmentation, Gaussian low-pass, teacher and "
             "student forward/backward, KD + easy-only CE + CAM, SGD); 'synq' = fastest "
             "backend per op, 'reference' = plain PyTorch ops. Random weights and images. "
             f"torch threads: {torch.get_num_threads()}. {rounds} round(s) alternating the "
             "two, each rate the fastest round's (all listed: reference rounds, then synq). "
             "On a CPU both run channels-last copies of the models (synq.finetune).")
    suffix = f"_{torch.get_num_threads()}t" if device == "cpu" else ""
    write_results("train_throughput", rows, device, out_dir, notes, suffix=suffix)
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    bench_main(run, __doc__)

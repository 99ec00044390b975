"""Where the time goes in the two GPU paths whose first timings missed their targets
(benchmarks/results/gpu_2026-11-27/README.md): the SynQ fine-tuning loop and the exported
integer ResNet-18 at batch 256. Not a benchmark: no speed ratio comes from here.

For each path it prints torch.profiler's top ops by device time and by host time, and every
host-device synchronization with the Python line that caused it (CUDA's sync debug mode).
One fine-tuning run (1 calibration epoch and 1 epoch of `iters` iterations) is profiled after
a warm-up run; the integer model's eager forward (CUDA graphs off) is profiled after two
warm-up calls.

    python -m benchmarks.gpu_profile [--device cuda|cpu] [--out FILE] [--small]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from synq.assets import load_default_teacher
from synq.deploy import export
from synq.finetune import FinetuneConfig, finetune
from synq.models import resnet18, resnet20
from synq.quant import calibrate, quantize_model

from .bench_train import random_bn


@contextlib.contextmanager
def _syncs(device, found):
    """Collect (file:line, message) of every synchronizing CUDA call made inside."""
    if device != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            found[f"{w.filename}:{w.lineno}"] += 1


def _activities(device):
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])


def _report(title, prof, device, syncs, out):
    print(f"\n## {title}\n", file=out)
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=20), file=out)
    if device == "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=out)
        print("synchronizing calls (Python line: count):", file=out)
        for where, n in syncs.most_common(20) or [("none", 0)]:
            print(f"  {where}: {n}", file=out)


def profile_finetune(device, small, out):
    """The synq loop of benchmarks.bench_train's case that missed its target (ResNet-18 at
    224x224, batch 64: 1.30x the reference loop on an H200), or a tiny ResNet-20 when small."""
    if small:
        name, build, batch, iters, shape = "resnet20", lambda: resnet20(10, 3), 16, 2, (3, 16, 16)
    else:
        name, build, batch, iters, shape = ("resnet18", lambda: resnet18(num_classes=1000), 64,
                                            2, (3, 224, 224))
    model = random_bn(build()).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * iters, *shape, generator=g)
    y = torch.randint(0, 10, (batch * iters,), generator=g)
    cfg = FinetuneConfig(wbits=4, abits=4, epochs=2, calib_epochs=1, iters_per_epoch=iters,
                         batch_size=batch, d0=80.0 * shape[-1] / 224, backend=None)
    finetune(model, (x, y), cfg, device=device, progress=False)      # warm-up
    syncs = collections.Counter()
    with profile(activities=_activities(device)) as prof, _syncs(device, syncs):
        finetune(model, (x, y), cfg, device=device, progress=False)
    _report(f"fine-tuning, {name} {shape} batch {batch}, {iters} iterations + calibration",
            prof, device, syncs, out)


def profile_int_forward(device, small, out):
    """The exported model's eager forward (graphs off: each kernel and its host cost seen):
    the bundled ResNet-20 at batch 1 when small, else ResNet-18 (224x224, random weights) at
    batch 256, the shape whose integer model is bound by its kernels on a GPU."""
    g = torch.Generator().manual_seed(0)
    if small:
        model, shape, batch, name = load_default_teacher()[0], (1, 28, 28), 1, "resnet20 (bundled)"
    else:
        model, shape, batch, name = random_bn(resnet18(1000)), (3, 224, 224), 256, "resnet18"
    calib = torch.randn(8, *shape, generator=g).to(device)
    im = export(calibrate(quantize_model(model.to(device), 8, 8), [calib]), example=calib[:1])
    im.replay = im.cuda_graphs = False               # the eager path
    x = torch.randn(batch, *shape, generator=g).to(device)
    reps = 2 if small else 3
    with torch.no_grad():
        im(x), im(x)
        syncs = collections.Counter()
        with profile(activities=_activities(device)) as prof, _syncs(device, syncs):
            for _ in range(reps):
                im(x)
    _report(f"exported W8A8 {name}, batch {batch}, eager forward x{reps}", prof, device,
            syncs, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_profile",
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--out", help="also write the report to this file")
    p.add_argument("--small", action="store_true", help="tiny sizes (a smoke test)")
    a = p.parse_args(argv)
    buf = io.StringIO()
    failed = 0
    for fn in (profile_int_forward, profile_finetune):
        try:
            fn(a.device, a.small, buf)
        except Exception as e:  # one path failing must not hide the other's profile
            failed += 1
            print(f"\n## {fn.__name__} FAILED: {type(e).__name__}: {e}", file=buf)
    text = buf.getvalue()
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

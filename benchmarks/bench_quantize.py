"""The exported model's activation quantization (synq_kernels.ops.quantize: one pass each)
against the PyTorch ops of the reference path (synq_kernels.reference.quantize), in the same
run:

- static, on an activation's grid: plain (act 0), after Hardswish (act 1, MobileNetV3), and
  after a per-channel x * mul + add and ReLU (act 2: an eval BatchNorm that no conv could
  take, DenseNet's); the reference makes five to eight passes;
- dynamic, from the tensor's own range (a layer input no quantizer fixes), per tensor and per
  row of a linear layer's input.

CPU: the C++ kernels against the reference's ops. GPU: the Triton static quantization (the
exporter's, after the activation and the affine map in PyTorch ops) against the same ops;
the dynamic rows have no GPU kernel and are skipped there.

On a CPU the reference's large intermediates are fresh allocations each call. glibc hands
large freed blocks back to the OS and faults them in again, and whether a process does so
depends on what it allocated before: a review measured the batch-32 reference rows 1.9x
and 16x the kernel in two processes of the same run, and 0.75-1.5 ms instead of 11 ms with
MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ set high. Read those rows across runs.

    python -m benchmarks.bench_quantize [--quick] [--device cpu|cuda] [--threads N] [--out DIR]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from synq_kernels.ops import quantize as Q
from synq_kernels.reference import quantize as R

from .common import bench_main, report, time_fn

# (what, activation shape): MobileNetV3 / DenseNet / ResNet activations at batch 1 and 32
SHAPES = [("stem, batch 1", (1, 16, 112, 112)), ("mid, batch 1", (1, 256, 28, 28)),
          ("late, batch 1", (1, 960, 7, 7)), ("mid, batch 32", (32, 128, 28, 28))]
QUICK = SHAPES[:3]
ROWS = [("linear input, batch 1", (1, 1280)), ("linear input, batch 256", (256, 2048))]


def _grid(device):
    return (torch.tensor([0.021], device=device),
            torch.tensor([-101], dtype=torch.int32, device=device))


def _static(x, act, affine, impl):
    s, z = _grid(x.device)
    mul, add = affine if affine else (None, None)
    if impl == "reference":
        return lambda: R.quantize_static(x, s, z, -128, 127, act, mul, add)
    if x.is_cuda:  # the exporter's GPU path: the rest in PyTorch ops, then Triton's pass
        from synq_kernels.triton import quantize as T
        view = (1, -1, 1, 1)

        def f():
            y = x * mul.reshape(view) + add.reshape(view) if affine else x
            y = F.hardswish(y) if act == 1 else torch.relu(y) if act == 2 else y
            return T.quantize_static(y, s, z, -128, 127)
        return f
    return lambda: Q.quantize_static(x, s, z, -128, 127, act, mul, add)


def run(quick: bool = False, device: str = "cpu", out_dir: str = "benchmarks/results"):
    if device == "cuda":
        try:
            from synq_kernels.triton import quantize as _  # noqa: F401
        except ImportError:
            print("no Triton: nothing to time on the GPU")
            return []
    elif not Q._has_kernel():
        print("synq_kernels._C not built: nothing to time")
        return []
    min_t = 0.2 if quick else 0.5
    gen = torch.Generator().manual_seed(0)
    rows = []
    for what, shape in QUICK if quick else SHAPES:
        x = (torch.randn(shape, generator=gen) * 2).to(device).contiguous(
            memory_format=torch.channels_last)
        c = shape[1]
        affine = ((torch.rand(c, generator=gen) + 0.5).to(device),
                  torch.randn(c, generator=gen).to(device))
        for op, act, aff in (("static", 0, None), ("static + Hardswish", 1, None),
                             ("static + BN + ReLU", 2, affine)):
            t_ref = time_fn(_static(x, act, aff, "reference"), device, min_t)
            t = time_fn(_static(x, act, aff, "synq"), device, min_t)
            rows.append({"op": op, "tensor": f"{what} {'x'.join(map(str, shape))}",
                         "synq_us": t * 1e6, "reference_us": t_ref * 1e6,
                         "speedup": t_ref / t})
            print(f"{rows[-1]['op']:>20} {rows[-1]['tensor']:>28} {t * 1e6:9.1f} us  "
                  f"x{t_ref / t:5.2f} vs the PyTorch ops", flush=True)
        if device == "cpu":
            t_ref = time_fn(lambda: R.quantize_dynamic(x, 1e-8), device, min_t)
            t = time_fn(lambda: Q.quantize_dynamic(x, 1e-8), device, min_t)
            rows.append({"op": "dynamic, per tensor", "tensor": f"{what} {'x'.join(map(str, shape))}",
                         "synq_us": t * 1e6, "reference_us": t_ref * 1e6, "speedup": t_ref / t})
    if device == "cpu":
        for what, shape in ROWS:
            x = torch.randn(shape, generator=gen) * 2
            t_ref = time_fn(lambda: R.quantize_dynamic_rows(x, 1e-8), device, min_t)
            t = time_fn(lambda: Q.quantize_dynamic_rows(x, 1e-8), device, min_t)
            rows.append({"op": "dynamic, per row", "tensor": f"{what} {'x'.join(map(str, shape))}",
                         "synq_us": t * 1e6, "reference_us": t_ref * 1e6, "speedup": t_ref / t})
    notes = ("Activation quantization: synq's one-pass kernels against the PyTorch ops of "
             "synq_kernels.reference.quantize, same run, channels-last float32 inputs "
             "(microseconds per call, medians). static + BN + ReLU: x * mul + add per "
             "channel, ReLU, then the grid (DenseNet's BN -> ReLU -> conv). On a CPU the "
             "reference rows of large tensors depend on whether glibc's allocator "
             "returns their intermediates to the OS in this process (page faults at "
             "every call): compare runs (see the module docstring).")
    report("quantize", rows, device, out_dir, notes)
    return rows


def main(argv=None):
    return bench_main(run, __doc__, argv)


if __name__ == "__main__":
    main()

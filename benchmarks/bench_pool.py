"""Max pooling of int8 activations (synq_kernels.max_pool2d_int8: the exported model's pool
after ResNet-18's stem) against what the exporter did before it, converting to float and
pooling with F.max_pool2d, and against F.max_pool2d of the float tensor (the float model's
pool), in the same run. 3x3, stride 2, padding 1, channels-last. Float is float32 on a CPU
and float16 on a GPU (the exporter's path there, and the float model's dtype).

    python -m benchmarks.bench_pool [--quick] [--device cpu|cuda] [--threads N] [--out DIR]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import synq_kernels as sk

from .common import bench_main, report, time_fn

SHAPES = [(1, 64, 112, 112), (32, 64, 112, 112), (256, 64, 112, 112)]
QUICK = SHAPES[:2]


def run(quick: bool = False, device: str = "cpu", out_dir: str = "benchmarks/results"):
    backends = [b for b in sk.available_backends("max_pool2d_int8", device) if b != "reference"]
    if device == "cpu":  # Triton on CPU tensors is the interpreter: not a benchmark
        backends = [b for b in backends if b != "triton"]
    if not backends:
        print(f"no max_pool2d_int8 kernel for {device}: nothing to time")
        return []
    min_t = 0.2 if quick else 0.5
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in QUICK if quick else SHAPES:
        q = torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen).to(device)
        q = q.contiguous(memory_format=torch.channels_last)
        dt = torch.float16 if device == "cuda" else torch.float32
        f = q.to(dt)
        t_float = time_fn(lambda: F.max_pool2d(f, 3, 2, 1), device, min_t)
        t_conv = time_fn(lambda: F.max_pool2d(q.to(dt), 3, 2, 1), device, min_t)
        for be in backends:
            t = time_fn(lambda: sk.max_pool2d_int8(q, 3, 2, 1, backend=be), device, min_t)
            name = str(dt).replace("torch.", "")
            rows.append({"shape": "x".join(map(str, shape)), "backend": be, "int8_us": t * 1e6,
                         f"{name}_pool_us": t_float * 1e6,
                         f"int8_to_{name}_pool_us": t_conv * 1e6,
                         f"vs_{name}_pool": t_float / t, f"vs_int8_to_{name}": t_conv / t})
            print(f"{rows[-1]['shape']:>16} {be:>8} {t * 1e6:10.1f} us  x{t_float / t:6.2f} "
                  f"vs the {name} pool  x{t_conv / t:6.2f} vs int8 -> {name} -> pool",
                  flush=True)
    notes = ("max_pool2d_int8 (3x3, stride 2, padding 1, channels-last int8) against "
             "F.max_pool2d of the float tensor and of the int8 tensor converted to float "
             "first (float32 on a CPU, float16 on a GPU), same run (microseconds per "
             "call, medians).")
    report("max_pool_int8", rows, device, out_dir, notes)
    return rows


def main(argv=None):
    return bench_main(run, __doc__, argv)


if __name__ == "__main__":
    main()

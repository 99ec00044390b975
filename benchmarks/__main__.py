"""Runs every kernel benchmark and prints its table:

    python -m benchmarks [--quick] [--device cpu|cuda] [--out benchmarks/results] [--only NAME]
"""
from __future__ import annotations

import argparse
import importlib
import time

import torch

from .common import device_name

# module name -> one-line description; a family whose module is absent is skipped.
FAMILIES = {  # the families with the issues' end-to-end targets first (a time limit cuts the tail)
    "bench_int_gemm": "int8 / int4 GEMM and conv vs torch._int_mm, matmul, conv2d",
    "bench_inference": "exported integer model latency vs the float model",
    "bench_train": "SynQ fine-tuning images/s, synq kernels vs the reference ops",
    # the tile sweeps (GPU only; they set the integer kernels' launch parameters) before the
    # three families whose kernels have not changed since both 2026-11-27 GPU runs timed them
    "bench_conv_tiles": "Triton tap-blocked int8 conv tiles vs cuDNN fp16 (GPU only)",
    "bench_gemm_tiles": "Triton int8 / W4A8 GEMM tiles vs fp16 matmul, torch._int_mm (GPU only)",
    "bench_fake_quant": "fake_quant forward / forward+backward vs torch fake-quant ops",
    "bench_lowpass": "low-pass filter vs the torch.fft path",
    "bench_channel_stats": "BN channel statistics (synthesis) vs torch.var_mean",
    "bench_quantize": "activation quantization (static, fused activation / BN; dynamic) vs PyTorch ops",
    "bench_pool": "int8 max-pool vs float32 max-pool",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (CPU: under 5 minutes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--out", default="benchmarks/results", help="folder for CSV / markdown")
    p.add_argument("--only", choices=[k.removeprefix("bench_") for k in FAMILIES],
                   help="run one family")
    a = p.parse_args(argv)
    print(f"synq benchmarks on {device_name(a.device)}, torch {torch.__version__}")
    failed = 0
    for mod, what in FAMILIES.items():
        if a.only and mod != "bench_" + a.only:
            continue
        try:
            m = importlib.import_module(f"benchmarks.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"benchmarks.{mod}":
                continue
            raise
        print(f"\n## {what}")
        t0 = time.time()
        try:
            m.run(quick=a.quick, device=a.device, out_dir=a.out)
        except Exception as e:  # one family failing must not hide the others' results
            failed += 1
            print(f"FAILED: {type(e).__name__}: {e}")
        print(f"({time.time() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

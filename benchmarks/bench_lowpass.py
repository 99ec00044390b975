"""Microbenchmark of the Gaussian low-pass filter (synq_kernels.lowpass) against its PyTorch
baseline, the torch.fft path of the reference (fft2, fftshift, mask, ifftshift, ifft2, real),
in the same run and on the same device.

Reports per (shape, backend): median time, GB/s counting one read and one write of x, speed-up
over the torch.fft path, and the fraction of the device's copy bandwidth (y.copy_(x), measured
in the same run). Writes CSV and markdown under benchmarks/results/, named with the device
and date.

    python benchmarks/bench_lowpass.py [--quick] [--out-dir DIR] [--dtype float32]

CPU timing: torch.utils.benchmark (median of blocked runs, torch's thread count). GPU timing:
triton.testing.do_bench (CUDA events, median).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re

import torch

SHAPES = [(256, 3, 32, 32), (64, 3, 224, 224), (256, 3, 224, 224)]
QUICK_SHAPES = [(256, 3, 32, 32), (64, 3, 224, 224)]
D0 = 80.0  # SynQ's default cut-off
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _time_ms(fn, device: torch.device, quick: bool) -> float:
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25 if quick else 100,
                                             rep=100 if quick else 500, return_mode="median"))
    from torch.utils import benchmark
    fn()  # warm-up: matrix caches, FFT plans
    t = benchmark.Timer("fn()", globals={"fn": fn})
    return t.blocked_autorange(min_run_time=0.3 if quick else 2.0).median * 1e3


def run(quick: bool = False, out_dir: str | None = RESULTS, dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None) -> list[dict]:
    """Time every available backend against the torch.fft reference; return one row per
    (shape, backend) and, if out_dir is not None, write lowpass_<device>_<date>.{csv,md}."""
    import synq_kernels as sk

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = [b for b in sk.available_backends("lowpass", device) if b != "reference"]
    if device.type == "cpu":  # Triton on CPU tensors is the interpreter: not a benchmark
        backends = [b for b in backends if b != "triton"]
    name = device_name(device)
    date = datetime.date.today().isoformat()
    rows = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        x = torch.randn(shape, device=device).to(dtype)
        nbytes = 2 * x.numel() * x.element_size()  # one read and one write of x
        y = torch.empty_like(x)
        t_copy = _time_ms(lambda: y.copy_(x), device, quick)
        copy_gbps = nbytes / t_copy / 1e6
        t_ref = _time_ms(lambda: sk.lowpass(x, D0, backend="reference"), device, quick)
        for backend in ["reference"] + backends:
            t = t_ref if backend == "reference" else \
                _time_ms(lambda: sk.lowpass(x, D0, backend=backend), device, quick)
            gbps = nbytes / t / 1e6
            rows.append({
                "date": date, "device": name, "shape": "x".join(map(str, shape)),
                "dtype": str(dtype).replace("torch.", ""), "mask": "gaussian", "d0": D0,
                "backend": backend if backend != "reference" else "reference (torch.fft)",
                "time_ms": round(t, 4), "gb_per_s": round(gbps, 2),
                "speedup_vs_fft": round(t_ref / t, 2),
                "copy_gb_per_s": round(copy_gbps, 2),
                "pct_of_copy_bw": round(100 * gbps / copy_gbps, 1),
            })
            print(f"{rows[-1]['shape']:>16} {rows[-1]['backend']:>22} {t:10.3f} ms "
                  f"{gbps:8.2f} GB/s  x{t_ref / t:6.2f} vs torch.fft  "
                  f"{rows[-1]['pct_of_copy_bw']:5.1f}% of copy", flush=True)
    if out_dir is not None and rows:
        write(rows, out_dir, device, name, date, quick)
    return rows


def write(rows: list[dict], out_dir: str, device: torch.device, name: str, date: str,
          quick: bool) -> str:
    os.makedirs(out_dir, exist_ok=True)
    tag = "cpu" if device.type == "cpu" else \
        "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    stem = os.path.join(out_dir, f"lowpass_{tag}_{date}{'_quick' if quick else ''}")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["shape", "backend", "time_ms", "gb_per_s", "speedup_vs_fft", "pct_of_copy_bw"]
    with open(stem + ".md", "w") as f:
        f.write(f"# lowpass (Gaussian, d0 = {D0:g}, {rows[0]['dtype']}) on {name}, {date}\n\n")
        f.write("Baseline: the torch.fft path of the reference, same run. GB/s counts one read "
                "and one write of x; copy = y.copy_(x) in the same run.")
        if device.type == "cpu" and hasattr(os, "getloadavg"):
            f.write(f" Load average at the end of the run: {os.getloadavg()[0]:.1f} "
                    f"(other work on the machine slows both columns alike).")
        f.write("\n\n")
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r[c]) for c in cols) + " |\n")
    print(f"wrote {stem}.csv and {stem}.md")
    return stem


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two shapes, short timing runs")
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    a = p.parse_args(argv)
    run(a.quick, a.out_dir, getattr(torch, a.dtype), a.device)


if __name__ == "__main__":
    main()

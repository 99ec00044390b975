"""Timing and result-writing helpers shared by the benchmarks.

GPU timings use CUDA events through triton.testing.do_bench (median); CPU timings use
torch.utils.benchmark (median of blocked runs). Every result file names its device, the
versions and the date."""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import re

import torch

# cuDNN picks its fastest algorithm per shape (timed at the first call, which every
# benchmark leaves out as warm-up): the fp16 baselines are cuDNN at its best.
torch.backends.cudnn.benchmark = True


def unverified_kernel_allowed(name: str) -> bool:
    """Whether to time an opt-in GPU kernel that has not run on a GPU before (GLUON_GEMM,
    GLUON_CONV, CUDA_GEMV): gpu_check.sh sets SYNQ_BENCH_<name>=0 unless the kernel's own GPU
    test passed in its test step (see benchmarks/gpu_gate.py); unset, the rows run."""
    return os.environ.get(f"SYNQ_BENCH_{name}", "1") != "0"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def device_tag(device: str) -> str:
    if device == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return "cpu"


def time_fn(fn, device: str, min_run_time: float = 0.5) -> float:
    """Median seconds per call of `fn`."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    from torch.utils import benchmark
    fn()  # warm-up (first-call allocations, lazy initialisation)
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median


def environment(device: str) -> dict:
    env = {"device": device_name(device), "torch": torch.__version__,
           "python": platform.python_version(),
           "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def write_results(name: str, rows: list[dict], device: str, out_dir: str,
                  notes: str = "", suffix: str = "") -> tuple[str, str]:
    """Write rows as CSV and as a markdown table; returns the two paths (named
    NAME_DEVICE_DATE + suffix, e.g. "_2t" for a thread count)."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{name}_{device_tag(device)}_{_dt.date.today().isoformat()}"
                        + suffix)
    keys = list(rows[0]) if rows else []
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    env = environment(device)
    with open(stem + ".md", "w") as f:
        f.write(f"# {name}\n\n")
        f.write("".join(f"- {k}: {v}\n" for k, v in env.items()))
        if notes:
            f.write(f"\n{notes}\n")
        f.write("\n" + markdown_table(rows) + "\n")
    return stem + ".csv", stem + ".md"


def report(name: str, rows: list[dict], device: str, out_dir: str | None, notes: str) -> None:
    """Print rows as a markdown table and, with an out_dir, write them (write_results)."""
    print(markdown_table(rows))
    if out_dir:
        paths = write_results(name, rows, device, out_dir, notes)
        print(f"wrote {paths[0]} and {paths[1]}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def bench_main(run, doc: str, argv=None):
    """The command line of a benchmark module: --quick, --device, --out, --threads, then
    run(quick, device, out_dir)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both synq and PyTorch (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"device: {device_name(a.device)}")
    return run(a.quick, a.device, a.out)


def tile_sweep(module, attr: str, names: tuple, configs, fn, shape: str, impl: str, ops: int,
               base_t: float, device: str, default_args: tuple) -> list[dict]:
    """Rows of one shape's tile sweep: `fn` timed with the module's own launch parameters
    (`module.<attr>`, a function of `default_args` giving a dict; the "(default)" row) and
    then with each configuration of `configs` forced (a tuple of the values of `names`).
    Results are compared with the first; MISMATCH marks one that differs. The attribute is
    restored afterwards."""
    default = getattr(module, attr)
    rows, want = [], None
    try:
        for cfg in [None] + list(configs):
            setattr(module, attr, default if cfg is None
                    else (lambda *a, _p=dict(zip(names, cfg)): dict(_p)))
            shown = str(tuple(default(*default_args).values()) if cfg is None else cfg)
            row = {"shape": shape, "impl": impl + (" (default)" if cfg is None else ""),
                   "config": shown}
            try:
                y = fn()
                want = y if want is None else want
                ok = torch.equal(y, want)
                t = time_fn(fn, device, 0.2)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                rows.append({**row, "ms": f"failed: {e}"[:80], "TOP/s": "",
                             "speedup_vs_fp16": ""})
                continue
            rows.append({**row, "impl": row["impl"] + ("" if ok else " MISMATCH"),
                         "ms": t * 1e3, "TOP/s": ops / t / 1e12, "speedup_vs_fp16": base_t / t})
    finally:
        setattr(module, attr, default)
    return rows


def sweep_summary(rows: list[dict]) -> str:
    """One line per (shape, kernel) of a tile sweep: the default configuration's time, the
    fastest forced configuration and its time relative to the default (the line to read
    before changing a config function)."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        if not r["config"] or not isinstance(r["ms"], float) or "MISMATCH" in r["impl"]:
            continue
        impl = r["impl"].removesuffix(" (default)")
        g = groups.setdefault((r["shape"], impl), {})
        if r["impl"].endswith("(default)"):
            g["default"] = r
        elif "best" not in g or r["ms"] < g["best"]["ms"]:
            g["best"] = r
    lines = []
    for (shape, impl), g in groups.items():
        if "default" in g and "best" in g:
            d, b = g["default"], g["best"]
            lines.append(f"- {shape}, {impl}: default {d['config']} {d['ms']:.4g} ms; best "
                         f"{b['config']} {b['ms']:.4g} ms ({b['ms'] / d['ms']:.2f}x the "
                         f"default's time)")
    return "\n".join(lines)


def write_sweep(name: str, rows: list[dict], device: str, out_dir: str | None,
                configs: str, final: bool = True) -> None:
    """The end of a tile sweep: its summary printed, and with `out_dir` its rows written with
    `configs` (what a config tuple holds) and the summary as notes. The sweeps also call it
    after each shape with final=False (written, not printed), so that a time limit that cuts
    a sweep short (gpu_check's benchmark step) leaves the shapes it finished."""
    summary = sweep_summary(rows)
    if final:
        print(summary)
    if out_dir:
        write_results(name, rows, device, out_dir,
                      f"{configs}; MISMATCH marks a result that differs from the first "
                      f"configuration's.\n\n{summary}")


def sweep_main(run, prog: str, argv=None) -> int:
    """Command line of a GPU tile sweep: `python -m <prog> [--out DIR] [--quick]`."""
    import argparse
    ap = argparse.ArgumentParser(prog=f"python -m {prog}")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{prog} needs a CUDA GPU")
        return 0
    run(a.quick, "cuda", a.out)
    return 0

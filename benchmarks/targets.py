"""The GPU targets of issues 4 and 7, read from one results folder (what gpu_check.sh wrote:
int_gemm_*.csv, inference_latency_*.csv, train_throughput_*.csv, conv_tiles_*.csv) and
printed as one table: target, best measured row, ratio, met or not. It times nothing;
every ratio is one the benchmarks computed against their baseline in the same run.

    python -m benchmarks.targets RESULTS_DIR [--out FILE.md]
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import sys


PREFIXES = ("int_gemm", "inference_latency", "train_throughput", "conv_tiles")
# issue 4's ResNet-18 layers (bench_int_gemm.RESNET18_CONVS), each listed even without a row
RESNET18_LAYERS = ("conv1", "layer1.conv", "layer2.0.conv1", "layer3.conv", "layer4.conv")
TARGET_CARD = "h100"  # the issues' targets are set for an H100
_NAME = re.compile(r"^(%s)_(.+?)_(\d{4}-\d{2}-\d{2})" % "|".join(PREFIXES))


def devices(folder: str) -> list[str]:
    """The device tags in the folder's file names (`int_gemm_nvidia-h200_2026-11-27.csv`:
    nvidia-h200), in order: a folder may hold the runs of several GPUs."""
    tags = set()
    for path in glob.glob(os.path.join(folder, "*.csv")):
        m = _NAME.match(os.path.basename(path))
        if m:
            tags.add(m.group(2))
    return sorted(tags)


def _rows(folder: str, prefix: str, device: str | None = None) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, f"{prefix}_*.csv"))):
        m = _NAME.match(os.path.basename(path))
        if device is not None and (m is None or m.group(2) != device):
            continue
        with open(path, newline="") as f:
            out += list(csv.DictReader(f))
    return out


def _num(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _best(rows: list[dict], key: str) -> dict | None:
    """The row with the largest number under `key` (rows without one left out)."""
    rows = [r for r in rows if _num(r.get(key)) is not None]
    return max(rows, key=lambda r: _num(r[key])) if rows else None


def targets(folder: str, device: str | None = None
            ) -> list[tuple[str, str, float | None, float, bool | None]]:
    """(target, what was measured, ratio, wanted ratio, met) per target, from the files of
    `device` (None: all files); ratio None where there is no row for it."""
    out = []
    gemm = _rows(folder, "int_gemm", device)

    def gemm_rows(shape, impl_part, kind="gemm"):
        return [r for r in gemm if r["kind"] == kind and r["shape"] == shape
                and impl_part in r["impl"] and r["impl"].startswith("synq")
                and "MISMATCH" not in r["impl"]]  # (a kernel that gave other integers)

    big = gemm_rows("4096x4096x4096", "int8_matmul")
    b = _best(big, "speedup_vs_float")
    out.append(("issue 4: int8 GEMM 4096^3 >= 1.6x fp16", b and b["impl"],
                _num(b["speedup_vs_float"]) if b else None, 1.6))
    ref = [r for r in gemm if r["shape"] == "4096x4096x4096" and r["impl"] == "torch._int_mm"]
    ratio = (_num(ref[0]["ms"]) / _num(b["ms"])) if b and ref and _num(ref[0]["ms"]) else None
    out.append(("issue 4: int8 GEMM 4096^3 >= 0.9x torch._int_mm", b and b["impl"], ratio, 0.9))
    b = _best(gemm_rows("1x4096x4096", "W4A8"), "speedup_vs_float")
    out.append(("issue 4: W4A8 at batch 1 (1x4096x4096) >= 3x fp16", b and b["impl"],
                _num(b["speedup_vs_float"]) if b else None, 3.0))
    # ResNet-18 convs at batch 256 against cuDNN fp16: the int_gemm conv rows, and the tile
    # sweep's default rows (the kernel as it picks its own tiles)
    layers = {}
    for r in gemm:  # (ResNet-20's convs share the file on a CPU: "r20.*")
        if r["kind"] == "conv" and " b256 " in f" {r['shape']} " and r["impl"].startswith("synq") \
                and not r["shape"].startswith("r20."):
            layers.setdefault(r["shape"], []).append(r)
    for r in _rows(folder, "conv_tiles", device):
        if "b256" in r["shape"] and r["impl"].startswith("synq") and "(default)" in r["impl"]:
            layers.setdefault(r["shape"], []).append(
                dict(r, speedup_vs_float=r.get("speedup_vs_fp16")))
    for shape, rs in sorted(layers.items()):
        b = _best(rs, "speedup_vs_float")
        out.append((f"issue 4: ResNet-18 conv {shape} faster than cuDNN fp16", b and b["impl"],
                    _num(b["speedup_vs_float"]) if b else None, 1.0))
    for name in RESNET18_LAYERS:  # a layer the run did not time says so
        if not any(shape.startswith(name + " b256") for shape in layers):
            out.append((f"issue 4: ResNet-18 conv {name} b256 faster than cuDNN fp16", None,
                        None, 1.0))
    inf = [r for r in _rows(folder, "inference_latency", device)
           if r["model"] == "resnet18" and r["batch"] == "256"]
    b = _best([r for r in inf if r["impl"].startswith("int W8A8")], "speedup_vs_float")
    out.append(("issue 7: W8A8 ResNet-18 at batch 256 >= 1.3x fp16",
                b and f"{b['impl']} [{b['backend']}]",
                _num(b["speedup_vs_float"]) if b else None, 1.3))
    # the same against the fp16 model replayed as a CUDA graph, where the run has that row
    fg = [r for r in inf if r["impl"].startswith("fp16") and r["impl"].endswith("graphs")]
    if b and fg and _num(fg[0]["ms"]):
        out.append(("issue 7: the same against the fp16 model under CUDA graphs",
                    f"{b['impl']} [{b['backend']}]", _num(fg[0]["ms"]) / _num(b["ms"]), 1.3))
    for r in _rows(folder, "train_throughput", device):
        out.append((f"issue 7: fine-tuning {r['model']} batch {r['batch']} >= 1.5x reference",
                    f"{_num(r['synq img/s']):.0f} vs {_num(r['reference img/s']):.0f} img/s",
                    _num(r["speedup"]), 1.5))
    return [(t, m or "no row", v, want, None if v is None else v >= want)
            for t, m, v, want in out]


def _card_note(tag: str) -> str:
    if not tag.startswith("nvidia"):
        return (f"Not a GPU run ({tag}): these are GPU targets; the ratios here are against "
                f"this device's own float baseline (fp32 on a CPU), not fp16 on an H100.\n\n")
    if TARGET_CARD not in tag:
        return (f"Measured on {tag}: the targets are set for an H100, so 'met' says how this "
                f"card did, not that the target is met.\n\n")
    return ""


def table(rows) -> str:
    lines = ["| target | best row | ratio | met |", "|---|---|---|---|"]
    for t, m, v, want, ok in rows:
        lines.append(f"| {t} | {m} | {'-' if v is None else f'{v:.3g}'} | "
                     f"{'no row' if ok is None else ('yes' if ok else 'no')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a results folder (gpu_check.sh's argument)")
    p.add_argument("--out", help="also write the table here (markdown)")
    a = p.parse_args(argv)
    if not os.path.isdir(a.folder):
        print(f"targets: no folder {a.folder}", file=sys.stderr)
        return 2
    tags = devices(a.folder)
    # one table per device (a ratio is only good against its own run), each named, and a note
    # where the device is not the targets' card
    text = "".join(f"\n## {t}\n\n" + _card_note(t) + table(targets(a.folder, t))
                   for t in tags) if tags else table(targets(a.folder))
    print(text, end="")
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

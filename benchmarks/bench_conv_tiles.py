"""Tile sweep of the Triton tap-blocked int8 conv (synq_kernels/triton/conv_tap.py,
_conv_tap_kernel) on the ResNet-18 layers at batch 32 and 256, against cuDNN's fp16
channels-last F.conv2d in the same run. GPU only. Each row times one launch configuration
forced through `_tap_config` ("default": the one the kernel picks by itself) on two calls:
quantized_conv2d (triton backend, channels-last int8 input and weight, float32 output) and
the fused W8A8 conv of an exported model (int8 out, offset term, int8 residual where the
shapes allow). What it finds goes into `_tap_config`.

    python -m benchmarks.bench_conv_tiles [--out DIR] [--quick]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import synq_kernels as sk
from synq_kernels.triton import conv_tap as T

from .bench_int_gemm import RESNET18_CONVS
from .common import (markdown_table, sweep_main, tile_sweep, time_fn, unverified_kernel_allowed,
                     write_sweep)

# (name, C, H, W, Cout, k, stride, padding) at 224 x 224 input: bench_int_gemm's ResNet-18
# convs on the tap-blocked path (>= 32 channels), and two more shapes
LAYERS = [layer for layer in RESNET18_CONVS if layer[1] >= 32] + [
    ("layer2.conv", 128, 28, 28, 128, 3, 1, 1),
    ("layer3.0.down", 128, 28, 28, 256, 1, 2, 0),
]
BATCHES, BATCHES_QUICK = (32, 256), (256,)
# (BM, BN, BK, num_warps, num_stages)
# K blocks of 128: Triton waits for each int8 wgmma before the next K block (conv_tap.py's
# docstring), so fewer, larger blocks may pay off now that A reaches the MMA from shared memory
CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 64, 64, 4, 3),
           (128, 64, 128, 4, 4), (64, 128, 64, 4, 3), (128, 128, 64, 8, 4),
           (256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 64, 64, 4, 4),
           (64, 128, 128, 4, 4), (128, 256, 128, 8, 3)]
# --quick (gpu_check's short budget, where two calls per configuration and compiles add up):
# the best of the ninth session's sweep for each layer, the old default and the BK = 128 ones
CONFIGS_QUICK = [(128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 256, 64, 8, 3),
                 (128, 128, 64, 8, 3), (64, 128, 128, 4, 4), (128, 128, 128, 8, 3)]
# + maxnreg, a register cap per thread, for the fused call where it adds an int8 residual:
# there the 4-warp tiles take 214-234 registers (sm_90 cubin, Triton 3.6), 2 programs per
# SM; 168 fits 3, and the spills it costs (16-64 bytes a thread) sit after the main loop
CONFIGS_MAXNREG = [(64, 128, 64, 4, 3, 168), (128, 64, 64, 4, 3, 168)]


def _fused_call(x, wq, ws, rs, cout, s, p, oh, ow, residual):
    """The conv as an exported W8A8 model runs it on a GPU (synq.deploy, fused): offset term,
    bias, an int8 residual if `residual` (a block's second conv), ReLU and int8
    requantization, in one kernel. The epilogue raises the kernel's registers
    (216 against 130 for the plain conv at the 64 x 128 x 64 tile, cuobjdump of the sm_90
    cubin), so its best tile may differ."""
    dev = x.device
    one = lambda v, dt=torch.float32: torch.tensor([v], dtype=dt, device=dev)  # noqa: E731
    off = torch.randint(-40, 40, (cout,), dtype=torch.int32, device=dev)
    bias = torch.randn(cout, device=dev)
    res = None
    if residual:
        res = torch.randint(-128, 128, (x.shape[0], cout, oh, ow), dtype=torch.int8,
                            device=dev).contiguous(memory_format=torch.channels_last)

    def fn():
        return T.fused_conv2d(x, one(0.02), one(3, torch.int32), wq, ws, rs, bias, (s, s),
                              (p, p), (1, 1), 1, True, offset=off, residual=res,
                              res_scale=one(0.03), res_zero=one(-128, torch.int32),
                              out_scale=one(0.05), out_zero=one(-128, torch.int32))
    return fn


def _gluon_rows(rows, x, wq, ws, rs, s, p, shape, ops, base, fn, quick) -> None:
    """The Gluon conv (conv_gluon.py, opt-in by SYNQ_GLUON_CONV=1), where it takes the layer
    (stride 1): one row per stage count (--quick: 4 stages, 64 and 256 channels only), its
    result checked against the tap kernel's."""
    from synq_kernels.triton import conv_gluon as G
    if (not G.usable(x, wq, (s, s), (p, p), (1, 1), 1, None, False)
            or not unverified_kernel_allowed("GLUON_CONV")):
        return
    if quick and x.shape[1] not in (64, 256):  # gpu_check's budget: layer1 and layer3 only
        return
    want = fn()
    xs = torch.tensor([0.02], device=x.device)
    xz = torch.tensor([3], dtype=torch.int32, device=x.device)
    for stages in (4,) if quick else (3, 4, 6):
        def gl_fn():
            return G.conv2d(x, xs, xz, wq, ws, rs, None, False, stages=stages)
        row = {"shape": shape, "impl": "synq gluon conv", "config": f"stages={stages}"}
        try:
            got = gl_fn()
            t = time_fn(gl_fn, x.device.type, 0.2)
        except Exception as e:  # noqa: BLE001 - it has not run on a GPU before
            rows.append({**row, "ms": f"failed: {e}"[:80], "TOP/s": "", "speedup_vs_fp16": ""})
            continue
        exact = torch.equal(got, want)
        rows.append({**row, "impl": row["impl"] + ("" if exact else " MISMATCH"),
                     "ms": t * 1e3, "TOP/s": ops / t / 1e12, "speedup_vs_fp16": base / t})


def run(quick: bool = False, device: str = "cuda", out_dir: str | None = None,
        allow_cpu: bool = False):
    """allow_cpu: run on CPU tensors too (Triton's interpreter; a smoke test of this script)."""
    if device != "cuda" and not allow_cpu:
        print("bench_conv_tiles times GPU tiles: skipped on", device)
        return []
    dev = device
    rows = []
    batches = BATCHES_QUICK if quick else BATCHES
    for b in batches:
        for name, c, h, w, cout, k, s, p in LAYERS:
            x = torch.randint(-128, 128, (b, c, h, w), dtype=torch.int8, device=dev)
            x = x.contiguous(memory_format=torch.channels_last)
            wq = torch.randint(-128, 128, (cout, c, k, k), dtype=torch.int8, device=dev)
            wq = wq.contiguous(memory_format=torch.channels_last)
            oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            ops = 2 * b * cout * oh * ow * c * k * k
            fdt = torch.float16 if dev == "cuda" else torch.float32
            xf, wf = x.to(fdt), wq.to(fdt)
            base = time_fn(lambda: F.conv2d(xf, wf, None, s, p), dev, 0.2)
            shape = f"{name} b{b} {c}x{h}x{w}->{cout} k{k}s{s}"
            rows.append({"shape": shape, "impl": "F.conv2d fp16 channels-last",
                         "config": "", "ms": base * 1e3, "TOP/s": ops / base / 1e12,
                         "speedup_vs_fp16": 1.0})
            ws, rs = torch.rand(cout, device=dev) + 0.1, sk.weight_row_sums(wq)

            def fn():
                with sk.value_checks(False):
                    return sk.quantized_conv2d(x, 0.02, 3, wq, ws, stride=s, padding=p,
                                               w_rowsum=rs, backend="triton")
            fits = lambda cfgs: [cfg for cfg in cfgs  # noqa: E731
                                 if cfg[1] <= max(cout, 32) and cfg[2] <= c]
            configs = fits(CONFIGS_QUICK if quick else CONFIGS)
            names = ("BM", "BN", "BK", "num_warps", "num_stages", "maxnreg")
            args = (b * oh * ow, c, cout, k * k, False)
            rows += tile_sweep(T, "_tap_config", names, configs, fn, shape, "synq triton tap",
                               ops, base, dev, args)
            if dev == "cuda":
                _gluon_rows(rows, x, wq, ws, rs, s, p, shape, ops, base, fn, quick)
            # an int8 residual where the output has the input's shape (a block's second conv)
            residual = s == 1 and c == cout and (oh, ow) == (h, w)
            rows += tile_sweep(T, "_tap_config", names,
                               configs + (fits(CONFIGS_MAXNREG) if residual else []),
                               _fused_call(x, wq, ws, rs, cout, s, p, oh, ow, residual), shape,
                               "synq triton tap fused W8A8", ops, base, dev, args)
            print(markdown_table([r for r in rows if r["shape"] == shape]), flush=True)
            write_sweep("conv_tiles", rows, dev, out_dir, CONFIGS_NOTE, final=False)
    write_sweep("conv_tiles", rows, dev, out_dir, CONFIGS_NOTE)
    return rows


CONFIGS_NOTE = ("config = (BM, BN, BK, num_warps, num_stages[, maxnreg]) of "
                "_conv_tap_kernel; speedup against cuDNN fp16 channels-last, same run")


def main(argv=None):
    return sweep_main(run, "benchmarks.bench_conv_tiles", argv)


if __name__ == "__main__":
    raise SystemExit(main())

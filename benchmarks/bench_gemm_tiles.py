"""Tile sweep of the Triton integer GEMM (synq_kernels/triton/int_gemm.py, _int_mm_kernel, and
at 4096^3 also quantized_linear's kernel, which takes the same tiles) on the shapes of issue
4's GPU targets, against fp16 torch.matmul and torch._int_mm in the same
run. GPU only. Each row times int8_matmul (or int4_matmul W4A8) on the triton backend with
one launch configuration forced through `_mm_config` (or int_gemv's `_gemv_config` for W4A8
at batch 1); "default" is the configuration the kernel picks by itself. What it finds goes
into those functions.

    python -m benchmarks.bench_gemm_tiles [--out DIR] [--quick]
"""
from __future__ import annotations

import torch

import synq_kernels as sk
from synq_kernels.triton import int_gemm as T
from synq_kernels.triton import int_gemm_gluon as G
from synq_kernels.triton import int_gemv as V

from .common import (markdown_table, sweep_main, tile_sweep, time_fn, unverified_kernel_allowed,
                     write_sweep)

# (M, K, N, W4A8): int8 x int8 at 4096^3 and M = 256, W4A8 at batch 1 and 16
SHAPES = [(4096, 4096, 4096, False), (256, 4096, 4096, False), (1, 4096, 4096, True),
          (16, 4096, 4096, True)]
# (BM, BN, BK, GROUP_M, num_warps, num_stages)
CONFIGS_LARGE = [(128, 128, 128, 8, 4, 3), (128, 128, 128, 8, 8, 3), (128, 256, 128, 8, 8, 3),
                 (128, 256, 64, 8, 8, 4), (256, 128, 128, 8, 8, 3), (128, 128, 64, 8, 4, 4),
                 (64, 256, 128, 8, 4, 3)]
CONFIGS_LARGE_QUICK = [CONFIGS_LARGE[i] for i in (0, 1, 2, 5)]  # --quick (gpu_check's budget)
CONFIGS_SMALL = [(16, 64, 128, 1, 4, 3), (16, 32, 256, 1, 4, 4), (16, 64, 256, 1, 4, 3),
                 (16, 128, 256, 1, 8, 3), (16, 32, 128, 1, 2, 4)]
# quantized_linear (the same GEMM with the float epilogue, tiles from _mm_config too) at
# 4096^3: 4 warps as the GEMM's default, the 8 it ran before (gpu_2026-11-27b: 0.62x fp16
# against the GEMM's 1.52x), and a narrower tile with fewer registers
CONFIGS_LINEAR = [(128, 128, 128, 8, 4, 3), (128, 128, 128, 1, 8, 3), (64, 128, 128, 8, 4, 3)]
LINEAR_SHAPE = (4096, 4096, 4096)  # (M, K, N)
# the Gluon int8 GEMM (int_gemm_gluon.py, opt-in by SYNQ_GLUON_GEMM=1; asynchronous wgmma):
# (BM, BN, BK, STAGES, GROUP_M, num_warps)
CONFIGS_GLUON = [(128, 256, 64, 4, 8, 8), (128, 128, 128, 3, 8, 4), (128, 256, 128, 3, 8, 8),
                 (128, 128, 64, 6, 8, 8), (256, 128, 64, 4, 8, 8)]
CONFIGS_GLUON_QUICK = CONFIGS_GLUON[:1]  # gpu_check's budget: the default and one more
# packed weights at M <= int_gemv.GEMV_MAX_M run the weight-streaming kernel:
# (BN, BKH, STAGES, num_warps)
CONFIGS_GEMV = [(16, 256, 4, 4), (32, 256, 3, 4), (16, 1024, 3, 8), (32, 512, 3, 8),
                (64, 256, 3, 8), (16, 512, 2, 4)]


def _forced(cfg):
    bm, bn, bk, gm, nw, ns = cfg
    return lambda *a: dict(BM=bm, BN=bn, BK=bk, GROUP_M=gm, num_warps=nw, num_stages=ns)


def run(quick: bool = False, device: str = "cuda", out_dir: str | None = None,
        allow_cpu: bool = False):
    """allow_cpu: run on CPU tensors too (Triton's interpreter; a smoke test of this script)."""
    if device != "cuda" and not allow_cpu:
        print("bench_gemm_tiles times GPU tiles: skipped on", device)
        return []
    rows = []
    fdt = torch.float16 if device == "cuda" else torch.float32
    for m, k, n, w4 in SHAPES:       # --quick: fewer configurations for the large M
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
        if w4:
            w = sk.pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, device=device))
        ops = 2 * m * n * k
        shape = f"{m}x{k}x{n}" + (" W4A8" if w4 else "")
        af, wf = a.to(fdt), torch.randn(n, k, device=device).to(fdt)
        base = time_fn(lambda: af @ wf.T, device, 0.2)
        rows.append({"shape": shape, "impl": f"torch.matmul {str(fdt)[6:]}", "config": "",
                     "ms": base * 1e3, "TOP/s": ops / base / 1e12, "speedup_vs_fp16": 1.0})
        if not w4 and m > 16 and device == "cuda":
            wt = w.T
            t = time_fn(lambda: torch._int_mm(a, wt), device, 0.2)
            rows.append({"shape": shape, "impl": "torch._int_mm", "config": "",
                         "ms": t * 1e3, "TOP/s": ops / t / 1e12,
                         "speedup_vs_fp16": base / t})

        def fn():
            if w4:
                return sk.int4_matmul(a, w, k=k, backend="triton")
            return sk.int8_matmul(a, w, backend="triton")
        if w4 and m <= V.GEMV_MAX_M:
            rows += tile_sweep(V, "_gemv_config", ("BN", "BKH", "STAGES", "num_warps"),
                               CONFIGS_GEMV, fn, shape, "synq triton gemv", ops, base, device,
                               (n, (k + 1) // 2, False))
        else:
            rows += tile_sweep(T, "_mm_config",
                               ("BM", "BN", "BK", "GROUP_M", "num_warps", "num_stages"),
                               CONFIGS_SMALL if m <= 16 else
                               (CONFIGS_LARGE_QUICK if quick else CONFIGS_LARGE), fn, shape,
                               "synq triton", ops, base, device, (m, n, k, False))
        if (not w4 and device == "cuda" and G.usable(a, w)
                and unverified_kernel_allowed("GLUON_GEMM")):
            exact = torch.equal(G.int8_matmul(a, w), torch._int_mm(a, w.T))
            rows += tile_sweep(G, "_config",
                               ("BM", "BN", "BK", "STAGES", "GROUP_M", "num_warps"),
                               CONFIGS_GLUON_QUICK if quick else CONFIGS_GLUON,
                               lambda: G.int8_matmul(a, w), shape,
                               "synq gluon" + ("" if exact else " WRONG vs torch._int_mm"),
                               ops, base, device, (m, n, k))
        if (m, k, n) == LINEAR_SHAPE and not w4:
            xs, xz = torch.tensor(0.02, device=device), torch.tensor(3, device=device)
            ws, rs = torch.rand(n, device=device) + 0.1, sk.weight_row_sums(w)

            def linear():
                with sk.value_checks(False):
                    return sk.quantized_linear(a, xs, xz, w, ws, w_rowsum=rs, backend="triton")
            rows += tile_sweep(T, "_mm_config",
                               ("BM", "BN", "BK", "GROUP_M", "num_warps", "num_stages"),
                               CONFIGS_LINEAR, linear, shape, "synq triton quantized_linear",
                               ops, base, device, (m, n, k, False))
        print(markdown_table([r for r in rows if r["shape"] == shape]), flush=True)
        write_sweep("gemm_tiles", rows, device, out_dir, CONFIGS_NOTE, final=False)
    write_sweep("gemm_tiles", rows, device, out_dir, CONFIGS_NOTE)
    return rows


CONFIGS_NOTE = ("config = (BM, BN, BK, GROUP_M, num_warps, num_stages) of _int_mm_kernel "
                "(and of _quantized_linear_kernel, float32 out), (BM, BN, BK, STAGES, "
                "GROUP_M, num_warps) of the Gluon kernel ('gluon' rows), or "
                "(BN, BKH, STAGES, num_warps) of int_gemv's kernel (the 'gemv' rows); speedup "
                "against fp16 torch.matmul, same run")


def main(argv=None):
    return sweep_main(run, "benchmarks.bench_gemm_tiles", argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Integer GEMM and conv against PyTorch's baselines in the same run.

GEMM: a (M, K) @ w (N, K).T with K = N = 4096: fp32 torch.matmul and torch._int_mm on the
CPU (fp16 / bf16 torch.matmul and torch._int_mm on a GPU) against synq int8_matmul, W4A8
int4_matmul and int8 quantized_linear (fused dequantizing epilogue, float32 out). Conv:
ResNet-18 layers at batch 1 and 256 against F.conv2d (fp32 on the CPU, fp16 channels-last
cuDNN on a GPU) and quantized_conv2d (channels-last input on a GPU);
on the CPU also the ResNet-20 (1x28x28 Fashion-MNIST) layers at batch 1, 32 and 256, the
prepacked int8-in / int8-out conv (quantized_conv2d_packed's kernel op, channels-last), the
MobileNetV2 depthwise layers at batch 1 and 8 against channels-last fp32 F.conv2d, and the
whole ResNet-20: fp32 model vs its integer version (benchmarks/int_resnet20.py).
Rate: GOP/s = 2 M N K / time.

    python -m benchmarks.bench_int_gemm [--quick] [--device cpu|cuda] [--out DIR] [--threads N]
        [--only gemm,conv,dw,resnet20]
"""
from __future__ import annotations

import argparse
import os
from unittest import mock

import torch
import torch.nn.functional as F

import synq_kernels as sk

from .common import (device_name, markdown_table, time_fn, unverified_kernel_allowed,
                     write_results)


def _gluon_usable(a, w) -> bool:
    from synq_kernels.triton import int_gemm_gluon
    return int_gemm_gluon.usable(a, w)

# (name, C, H, W, Cout, k, stride, padding) at 224 x 224 input
RESNET18_CONVS = [
    ("conv1", 3, 224, 224, 64, 7, 2, 3),
    ("layer1.conv", 64, 56, 56, 64, 3, 1, 1),
    ("layer2.0.conv1", 64, 56, 56, 128, 3, 2, 1),
    ("layer3.conv", 256, 14, 14, 256, 3, 1, 1),
    ("layer4.conv", 512, 7, 7, 512, 3, 1, 1),
]

# ResNet-20 on 1 x 28 x 28 inputs (synq.models.resnet20(in_channels=1)): every distinct conv
RESNET20_CONVS = [
    ("r20.conv1", 1, 28, 28, 16, 3, 1, 1),
    ("r20.layer1.conv", 16, 28, 28, 16, 3, 1, 1),
    ("r20.layer2.0.conv1", 16, 28, 28, 32, 3, 2, 1),
    ("r20.layer2.0.shortcut", 16, 28, 28, 32, 1, 2, 0),
    ("r20.layer2.conv", 32, 14, 14, 32, 3, 1, 1),
    ("r20.layer3.0.conv1", 32, 14, 14, 64, 3, 2, 1),
    ("r20.layer3.0.shortcut", 32, 14, 14, 64, 1, 2, 0),
    ("r20.layer3.conv", 64, 7, 7, 64, 3, 1, 1),
]
RESNET20_BATCHES = [1, 32, 256]

# MobileNetV2 depthwise convs at 224 x 224 input (groups = C = Cout); on the CPU the float
# baseline is F.conv2d on channels-last input, oneDNN's fast depthwise layout (NCHW is 2-20x
# slower there)
MOBILENETV2_DW = [
    ("mbv2.dw32", 32, 112, 112, 32, 3, 1, 1, 32),
    ("mbv2.dw144.s2", 144, 56, 56, 144, 3, 2, 1, 144),
    ("mbv2.dw192", 192, 28, 28, 192, 3, 1, 1, 192),
    ("mbv2.dw384", 384, 14, 14, 384, 3, 1, 1, 384),
    ("mbv2.dw960", 960, 7, 7, 960, 3, 1, 1, 960),
]


def _backends(op, device):
    return [b for b in sk.available_backends(op, device)
            if b != "reference" and not (device == "cpu" and b == "triton")]


def _row(kind, shape, impl, t, ops, base_t):
    return {"kind": kind, "shape": shape, "impl": impl, "ms": t * 1e3,
            "GOP/s": ops / t / 1e9, "speedup_vs_float": base_t / t if base_t else ""}


def _mismatch(ok: bool) -> str:
    """The mark of a row whose kernel gave other integers than the tested backend (the opt-in
    kernels that have not run on a GPU before); targets.py leaves such rows out."""
    return "" if ok else " MISMATCH"


def _gemm_rows(m, k, n, device, quick):
    rows = []
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
    w4 = sk.pack_int4(torch.randint(-8, 8, (n, k), device=device))
    ops = 2 * m * n * k
    shape = f"{m}x{k}x{n}"
    mrt = 0.2 if quick else 0.5
    floats = [torch.float32] if device == "cpu" else [torch.float16, torch.bfloat16]
    base_t = None
    for dt in floats:
        af, wf = a.to(dt), w.to(dt)
        t = time_fn(lambda: af @ wf.T, device, mrt)
        base_t = base_t or t
        rows.append(_row("gemm", shape, f"torch.matmul {str(dt)[6:]}", t, ops, base_t))
    wt = w.T  # torch._int_mm's fast layout: (K, N) with N-major strides
    try:
        t = time_fn(lambda: torch._int_mm(a, wt), device, mrt)
        rows.append(_row("gemm", shape, "torch._int_mm", t, ops, base_t))
    except RuntimeError as e:  # e.g. M <= 16 on CUDA
        rows.append({"kind": "gemm", "shape": shape, "impl": "torch._int_mm",
                     "ms": f"n/a ({str(e).splitlines()[0][:60]})", "GOP/s": "",
                     "speedup_vs_float": ""})
    xs, xz, ws = 0.02, 3, torch.rand(n, device=device) + 0.1
    rs = sk.weight_row_sums(w)
    for b in _backends("int_mm", device):
        t = time_fn(lambda: sk.int8_matmul(a, w, backend=b), device, mrt)
        rows.append(_row("gemm", shape, f"synq int8_matmul [{b}]", t, ops, base_t))
        if (b == "triton" and device == "cuda" and _gluon_usable(a, w)
                and unverified_kernel_allowed("GLUON_GEMM")):
            # the Gluon kernel, opt-in until it has run on a GPU
            want = sk.int8_matmul(a, w, backend=b)      # the tested triton kernel
            with mock.patch.dict(os.environ, {"SYNQ_GLUON_GEMM": "1"}):
                ok = torch.equal(sk.int8_matmul(a, w, backend=b), want)
                t = time_fn(lambda: sk.int8_matmul(a, w, backend=b), device, mrt)
            rows.append(_row("gemm", shape, "synq int8_matmul [triton, SYNQ_GLUON_GEMM=1]"
                             + _mismatch(ok), t, ops, base_t))
        t = time_fn(lambda: sk.int4_matmul(a, w4, backend=b), device, mrt)
        rows.append(_row("gemm", shape, f"synq int4_matmul W4A8 [{b}]", t, ops, base_t))
        # the dp4a GEMV, opt-in until it has run on a GPU
        if b == "cuda" and m <= 4 and unverified_kernel_allowed("CUDA_GEMV"):
            want = sk.int4_matmul(a, w4, backend=b)
            with mock.patch.dict(os.environ, {"SYNQ_CUDA_GEMV": "1"}):
                ok = torch.equal(sk.int4_matmul(a, w4, backend=b), want)
                t = time_fn(lambda: sk.int4_matmul(a, w4, backend=b), device, mrt)
            rows.append(_row("gemm", shape, "synq int4_matmul W4A8 [cuda, SYNQ_CUDA_GEMV=1]"
                             + _mismatch(ok), t, ops, base_t))
        with sk.value_checks(False):
            t = time_fn(lambda: sk.quantized_linear(a, xs, xz, w, ws, w_rowsum=rs, backend=b),
                        device, mrt)
        rows.append(_row("gemm", shape, f"synq quantized_linear int8 [{b}]", t, ops, base_t))
    return rows


def _conv_rows(layer, batch, device, quick):
    name, c, h, w_, cout, k, s, p = layer[:8]
    g = layer[8] if len(layer) > 8 else 1
    rows = []
    x = torch.randint(-128, 128, (batch, c, h, w_), dtype=torch.int8, device=device)
    wq = torch.randint(-128, 128, (cout, c // g, k, k), dtype=torch.int8, device=device)
    if device == "cuda" or g > 1:  # channels-last: cuDNN's fast fp16 layout, synq's on the
        x = x.contiguous(memory_format=torch.channels_last)  # GPU, oneDNN's for depthwise
    oh = (h + 2 * p - k) // s + 1
    ow = (w_ + 2 * p - k) // s + 1
    ops = 2 * batch * cout * oh * ow * (c // g) * k * k
    shape = f"{name} b{batch} {c}x{h}x{w_}->{cout} k{k}s{s}" + (f"g{g}" if g > 1 else "")
    mrt = 0.2 if quick else 0.5
    dt = torch.float32 if device == "cpu" else torch.float16
    xf, wf = x.to(dt), wq.to(dt)
    if device == "cuda":
        wf = wf.contiguous(memory_format=torch.channels_last)
    base_t = time_fn(lambda: F.conv2d(xf, wf, None, s, p, 1, g), device, mrt)
    layout = " channels-last" if x.is_contiguous(memory_format=torch.channels_last) else ""
    base_rows = [_row("conv", shape, f"F.conv2d {str(dt)[6:]}{layout}", base_t, ops, base_t)]
    if device == "cpu" and not layout:
        # oneDNN's float32 convs are faster channels-last (1.03-2x on ResNet-20's layers): the
        # speedups are against the faster layout
        xcl = xf.contiguous(memory_format=torch.channels_last)
        t_cl = time_fn(lambda: F.conv2d(xcl, wf, None, s, p, 1, g), device, mrt)
        base_rows.append(_row("conv", shape, "F.conv2d float32 channels-last", t_cl, ops,
                              base_t))
        base_t = min(base_t, t_cl)
        for r in base_rows:
            r["speedup_vs_float"] = base_t / (r["ms"] / 1e3)
    rows += base_rows
    ws, rs = torch.rand(cout, device=device) + 0.1, sk.weight_row_sums(wq)
    for b in _backends("quantized_conv2d", device):
        with sk.value_checks(False):
            t = time_fn(lambda: sk.quantized_conv2d(x, 0.02, 3, wq, ws, stride=s, padding=p,
                                                    groups=g, w_rowsum=rs, backend=b),
                        device, mrt)
        rows.append(_row("conv", shape, f"synq quantized_conv2d int8 [{b}]", t, ops, base_t))
    if device == "cpu" and "cpu" in _backends("quantized_conv2d", device):
        rows += _packed_conv_rows(x, wq, ws, s, p, shape, ops, base_t, mrt, g)
    return rows


def _packed_conv_rows(x, wq, ws, s, p, shape, ops, base_t, mrt, g=1):
    """The exporter's CPU path: channels-last int8 in, prepacked weight, bias + ReLU +
    requantization to int8 in the epilogue, the kernel op called directly."""
    xc = x.contiguous(memory_format=torch.channels_last)
    wp = sk.prepack_conv2d_weight(wq, g)
    op = torch.ops.synq._quantized_conv2d_packed.default
    xs, xz = torch.tensor([0.02]), torch.tensor([3], dtype=torch.int32)
    os_, oz = torch.tensor([0.5]), torch.tensor([-128], dtype=torch.int32)
    bias = torch.randn(wq.shape[0])
    t = time_fn(lambda: op(xc, xs, xz, wp, ws, bias, [s, s], [p, p], [1, 1], g, True,
                           torch.int8, os_, oz, None, None, None), "cpu", mrt)
    return [_row("conv", shape, "synq quantized_conv2d_packed int8->int8 [cpu]", t, ops,
                 base_t)]


def _resnet20_rows(batches, quick):
    from .int_resnet20 import build
    model, folded, intm = build()
    rows = []
    for batch in batches:
        x = torch.randn(batch, 1, 28, 28)
        shape = f"resnet20 b{batch} 1x28x28"
        mrt = 0.3 if quick else 1.0
        with torch.inference_mode():
            base = time_fn(lambda: model(x), "cpu", mrt)
            tf = time_fn(lambda: folded(x), "cpu", mrt)
            ti = time_fn(lambda: intm(x), "cpu", mrt)
        for impl, t in (("fp32 model (eval, F.conv2d + BN)", base),
                        ("fp32 BN-folded (F.conv2d)", tf),
                        ("synq int8 (packed conv, int8 activations)", ti)):
            rows.append({"kind": "model", "shape": shape, "impl": impl, "ms": t * 1e3,
                         "GOP/s": "", "speedup_vs_float": base / t})
        print(markdown_table(rows[-3:]), flush=True)
    return rows


def run(quick: bool = False, device: str = "cpu", out_dir: str | None = None,
        only: tuple[str, ...] = ("gemm", "conv", "dw", "resnet20")) -> list[dict]:
    ms, batches = [1, 16, 256, 4096], [1, 256]  # issue 4's shapes
    if quick and device == "cpu":
        ms, batches = ms[:2], batches[:1]
    rows = []
    for m in ms if "gemm" in only else []:
        rows += _gemm_rows(m, 4096, 4096, device, quick)
        print(markdown_table(rows[-6:]), flush=True)
    # --quick keeps the stem on a GPU: the biggest conv at batch 256 in the first profile
    layers = (RESNET18_CONVS[:4] if device == "cuda" else RESNET18_CONVS[1:4]) if quick \
        else RESNET18_CONVS
    for batch in batches if "conv" in only else []:
        for layer in layers:
            rows += _conv_rows(layer, batch, device, quick)
            print(markdown_table(rows[-3:]), flush=True)
    if device == "cpu" and "conv" in only:
        for batch in RESNET20_BATCHES[:2] if quick else RESNET20_BATCHES:
            for layer in RESNET20_CONVS:
                rows += _conv_rows(layer, batch, device, quick)
                print(markdown_table(rows[-3:]), flush=True)
    if device == "cpu" and "dw" in only:
        for batch in [1] if quick else [1, 8]:
            for layer in MOBILENETV2_DW[::2] if quick else MOBILENETV2_DW:
                rows += _conv_rows(layer, batch, device, quick)
                print(markdown_table(rows[-3:]), flush=True)
    if device == "cpu" and "resnet20" in only:
        rows += _resnet20_rows(RESNET20_BATCHES, quick)
    if out_dir:
        suffix = f"_{torch.get_num_threads()}t" if device == "cpu" else ""
        write_results("int_gemm", rows, device, out_dir, suffix=suffix,
                      notes="speedup_vs_float = time of the float baseline of the same "
                            "shape (fp32 torch.matmul / F.conv2d on the CPU, the faster of "
                            "NCHW and channels-last for a conv; fp16 on a GPU) / time of the "
                            "row, same run. GOP/s counts 2 M N K. int8 operands are uniformly "
                            "random; quantized_linear / quantized_conv2d include the float32 "
                            "dequantizing epilogue, the packed conv row requantizes to int8 "
                            "(bias, ReLU) as an exported model runs it.")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); 1 gives steadier numbers on a "
                        "machine whose cores are shared with other jobs")
    p.add_argument("--only", default="gemm,conv,dw,resnet20",
                   help="comma-separated parts to run: gemm, conv, dw (MobileNetV2 depthwise, "
                        "CPU only), resnet20 (CPU only)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"int_gemm on {device_name(a.device)}")
    run(a.quick, a.device, a.out, tuple(a.only.split(",")))


if __name__ == "__main__":
    main()

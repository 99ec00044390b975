"""End to end: latency of the exported integer model (synq.deploy) against the float model
in the same run: fp32 on a CPU (as built, NCHW, and channels-last with BatchNorm folded; the
speedups are against the faster of the two), fp16 channels-last on a GPU.

Models: the bundled Fashion-MNIST ResNet-20 (1x28x28, its trained weights) and ResNet-18 at
3x224x224 (random weights, random BatchNorm statistics: latency does not depend on them),
on a CPU also MobileNetV2 at 3x224x224 (batch 1 and 8; random as ResNet-18),
exported at W8A8 and W4A4 after calibration on one random batch, at batch 1, 32 and 256.
On a GPU every integer backend available is timed; the plot (PNG, if matplotlib is
installed) shows latency against batch size per model, bit-width and backend.

    python -m benchmarks.bench_inference [--quick] [--device cpu|cuda] [--out DIR]
"""
from __future__ import annotations

import copy

import torch

import synq_kernels as sk
from synq.assets import load_default_teacher
from synq import deploy
from synq.cuda_graphs import GraphCache
from synq.deploy import export
from synq.models import mobilenet_v2, resnet18
from synq.quant import calibrate, quantize_model

from .bench_train import random_bn
from .common import bench_main, device_name, markdown_table, time_fn, write_results

BATCHES = (1, 32, 256)


def _models(quick, device):
    yield "resnet20", load_default_teacher()[0], (1, 28, 28), BATCHES
    r18_batches = (1, 32) if (quick and device == "cpu") else BATCHES
    yield "resnet18", random_bn(resnet18(num_classes=1000)), (3, 224, 224), r18_batches
    if device == "cpu":  # depthwise convs: the CPU kernel's own path
        yield ("mobilenetv2", random_bn(mobilenet_v2(num_classes=1000)), (3, 224, 224),
               (1,) if quick else (1, 8))


def _float_model(model, device):
    if device == "cpu":
        return model.float().eval(), torch.float32, torch.contiguous_format


def _fast_float_cpu(model):
    """The fp32 model as fast as PyTorch runs it on a CPU: BatchNorm folded into the convs
    (torch.fx.experimental.optimization.fuse; as it is where the model does not trace) and
    channels-last (oneDNN's layout; 1.1-1.5x the NCHW model on this project's CPU)."""
    from torch.fx.experimental.optimization import fuse
    m = copy.deepcopy(model).float().eval()
    try:
        m = fuse(m)
    except Exception:  # noqa: BLE001 - an untraceable model: channels-last only
        pass
    return m.to(memory_format=torch.channels_last)
    m = copy.deepcopy(model).to(device).half().to(memory_format=torch.channels_last).eval()
    return m, torch.float16, torch.channels_last


def run(quick: bool = False, device: str = "cpu", out_dir: str = "benchmarks/results"):
    rows = []
    mrt = 0.3 if quick else 0.5
    rounds = 1 if device == "cuda" else (2 if quick else 3)
    for name, model, shape, batches in _models(quick, device):
        fmodel, fdt, fmt = _float_model(model, device)
        fast_fp32 = _fast_float_cpu(model) if device == "cpu" else None
        g = torch.Generator().manual_seed(0)
        calib = torch.randn(32, *shape, generator=g).to(device)
        ints = {}
        for bits in (8, 4):
            q = calibrate(quantize_model(model.to(device), bits, bits), [calib])
            ints[bits] = export(q, example=calib[:1])
        backends = ([b for b in sk.available_backends("quantized_conv2d", device)
                     if b != "reference"] if device == "cuda" else [None])
        for b in batches:
            x = torch.randn(b, *shape, generator=g).to(device)
            xf = x.to(fdt).contiguous(memory_format=fmt)
            base_name = "fp32" if device == "cpu" else "fp16 channels-last"
            cands = [((base_name, "torch"), None, lambda: fmodel(xf))]
            if device == "cpu":     # the fastest fp32 model too: the speedups are against it
                xcl = x.contiguous(memory_format=torch.channels_last)
                cands.append((("fp32 channels-last, BN folded", "torch"), None,
                              lambda: fast_fp32(xcl)))
            if device == "cuda":    # the float model under CUDA graphs too (synq's GraphCache)
                fgraphs = GraphCache()
                cands.append(((base_name + " graphs", "torch"), None,
                              lambda: fgraphs(fmodel, xf)))
            for bits, im in ints.items():
                call = (lambda im: lambda: im(x))(im)
                # --quick on a GPU (a short device budget): the model as it runs by default,
                # and W8A8 without graphs; no per-backend or unfused rows (the cuda conv
                # backend and the unfused path trailed in every row of the 2026-11-27 runs,
                # and W4A4 ran within 1% of W8A8, the same conv kernels)
                full = not (quick and device == "cuda")
                for be in backends if full else [None]:
                    if full or bits == 8:
                        cands.append(((f"int W{bits}A{bits}", be or "default"),
                                      (im, be, True, False, True), call))
                    if device == "cuda":    # the same with CUDA-graph replay (IntModel.cuda_graphs)
                        cands.append(((f"int W{bits}A{bits} graphs", be or "default"),
                                      (im, be, True, True, True), call))
                    if device == "cuda" and be == "triton" and full:  # no fused conv epilogue
                        cands.append(((f"int W{bits}A{bits} graphs unfused", be),
                                      (im, be, True, True, False), call))
                if b == 1 and device == "cpu":
                    # the same model without replay (IntModel.replay): its Python every call
                    cands.append(((f"int W{bits}A{bits} eager", "default"),
                                  (im, None, False, False, True), call))
            # rounds interleave the candidates, so that a slow phase of a shared machine
            # hits all of them; each row keeps its fastest round
            runs = [[] for _ in cands]
            chosen = {}
            for r in range(rounds):
                for i, (_, setting, fn) in enumerate(cands):
                    if setting is not None:
                        im, be, rp, graphs, fused = setting
                        if chosen.get(id(im), "unset") != (be, fused):
                            deploy.GPU_FUSED = fused
                            im.set_backend(be)      # (drops its recordings and graphs)
                            chosen[id(im)] = (be, fused)
                        im.replay, im.cuda_graphs = rp, graphs
                    with torch.no_grad():
                        if r == 0:
                            fn()    # with time_fn's warm-up: caches built, ops recorded
                        runs[i].append(time_fn(fn, device, mrt))
            # CPU: the faster of the two fp32 rows; GPU: the eager fp16 model (and the graphs
            # column against its CUDA graph)
            base = min(runs[0]) if device == "cuda" else min(min(runs[0]), min(runs[1]))
            for ((impl, be), _, _), ts in zip(cands, runs):
                t = min(ts)
                row = {"model": name, "batch": b, "impl": impl, "backend": be,
                       "ms": t * 1e3, "img/s": b / t, "speedup_vs_float": base / t}
                if device == "cuda":
                    row["speedup_vs_float_graphs"] = min(runs[1]) / t
                row["ms_rounds"] = " / ".join(f"{v * 1e3:.4g}" if v < 10 else
                                              f"{v * 1e3:.0f}" for v in ts)
                rows.append(row)
            deploy.GPU_FUSED = True
            for im in ints.values():
                im.replay, im.cuda_graphs = True, True     # the defaults
                im.set_backend(None)
                for key, why in im.graph_refusals().items():
                    print(f"CUDA graph refused for {name} input {key[0]}: {why}")
            print(markdown_table([r for r in rows if r["model"] == name and r["batch"] == b]),
                  flush=True)
    threads = torch.get_num_threads()
    notes = (f"Exported integer models (synq.deploy.export) vs the float model in the same "
             f"run. torch threads: {threads}. " + (
             "speedup_vs_float is against the eager fp16 model, speedup_vs_float_graphs "
             "against the same model replayed as a CUDA graph (synq.cuda_graphs.GraphCache); "
             "'graphs' rows replay the integer model's graph (its default), 'unfused' rows "
             "run without the fused conv epilogue (synq.deploy.GPU_FUSED = False). "
             if device == "cuda" else
             f"{rounds} rounds, each timing every row of a batch in turn; ms is the fastest "
             "round's median (ms_rounds lists them); speedup_vs_float is the faster fp32 "
             "row's time (NCHW as built, or channels-last with BatchNorm folded by "
             "torch.fx.experimental.optimization.fuse) over the row's. "
             "Integer rows replay the recorded ops of the model (IntModel.replay, the "
             "default on a CPU, run by the C++ plan of csrc/replay.cpp where synq_kernels._C "
             "is built); 'eager' rows at batch 1 run its Python every call. "
             "ResNet-18 at batch 256 is left out by --quick on a CPU."))
    suffix = f"_{threads}t" if device == "cpu" else ""
    csv_path, _ = write_results("inference_latency", rows, device, out_dir, notes, suffix)
    plot(rows, csv_path[:-4] + ".png", device)
    return rows


def plot(rows, path, device):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        series = {}
        for r in rows:
            if r["model"] == model:
                key = r["impl"] if r["backend"] in ("torch", "default") else \
                    f"{r['impl']} ({r['backend']})"
                series.setdefault(key, []).append((r["batch"], r["ms"]))
        for key, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("latency per batch (ms)")
        ax.set_title(f"{model} on {device_name(device)}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")
    return path


if __name__ == "__main__":
    bench_main(run, __doc__)

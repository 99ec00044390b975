"""Per-channel batch statistics (synq_kernels.channel_stats), the cost centre of
BN-statistics synthesis, against PyTorch's torch.var_mean over (B, H, W) with its autograd, in
the same run; and one synthesis step of the bundled ResNet-20 (batch 256, 1x28x28) with the
statistics from each backend.

Shapes: the BN inputs of ResNet-20 at 28x28 (batch 256) and of ResNet-18 at 224x224 (batch
64), each NCHW and channels-last (synthesis on a CPU runs the model channels-last). Each row is
timed forward alone and forward + backward (the loss (mean^2 + var).sum()), in interleaved
rounds on a CPU (the fastest kept). On a GPU it times the triton backend against the
reference, which is the default there until this benchmark shows otherwise.

On a CPU, the channels-last shapes also time what a BN layer costs synthesis: eval-mode
BatchNorm plus the statistics of its input, forward and backward (loss y.sum() + (mean^2 +
var).sum()), as separate ops (F.batch_norm and the cpu channel_stats: what synthesis ran
before) against synq_kernels.batch_norm_stats, which fuses them; and the synthesis step with
and without that fusion.

    python -m benchmarks.bench_channel_stats [--quick] [--device cpu|cuda] [--threads N] [--out DIR]
"""
from __future__ import annotations

import os
import time

import torch

import synq_kernels as sk

from .common import bench_main, markdown_table, time_fn, write_results

SHAPES = [("resnet20 layer1", (256, 16, 28, 28)), ("resnet20 layer2", (256, 32, 14, 14)),
          ("resnet20 layer3", (256, 64, 7, 7)), ("resnet18 stem", (64, 64, 112, 112)),
          ("resnet18 layer1", (64, 64, 56, 56)), ("resnet18 layer4", (64, 512, 7, 7))]
QUICK = SHAPES[:3]


def _fwd(x, backend):
    def f():
        with torch.no_grad():
            sk.channel_stats(x, backend=backend)
    return f


def _fwd_bwd(x, backend):
    def f():
        m, v = sk.channel_stats(x, backend=backend)
        torch.autograd.grad((m.square() + v).sum(), x)  # (no accumulation into x.grad)
    return f


def _bn_separate(x, p):
    def f():
        y = torch.nn.functional.batch_norm(x, p[0], p[1], p[2], p[3], False, 0.0, 1e-5)
        m, v = sk.channel_stats(x, backend="cpu")
        torch.autograd.grad(y.sum() + (m.square() + v).sum(), x)
    return f


def _bn_fused(x, p):
    def f():
        y, m, v = sk.batch_norm_stats(x, *p, backend="cpu")
        torch.autograd.grad(y.sum() + (m.square() + v).sum(), x)
    return f


def _synthesis_step_seconds(backend: str, steps: int, device: str,
                            channels_last: bool, fused: bool = True) -> float:
    """Seconds per Adam step of synq.synth.synthesize on the bundled teacher, with
    channel_stats on `backend` (through SYNQ_BACKEND: the teacher is float, so it is the only
    synq op of the step), on a CPU the model channels-last or not, and BN layers fused with
    their statistics (synq.losses.BNStats) or not."""
    import functools
    import tempfile

    import synq.synth as S
    from synq.assets import load_default_teacher
    from synq.losses import BNStats
    model = load_default_teacher()[0].to(device)
    old = os.environ.get("SYNQ_BACKEND"), S.CPU_CHANNELS_LAST, S.BNStats
    os.environ["SYNQ_BACKEND"] = backend
    S.CPU_CHANNELS_LAST = channels_last
    S.BNStats = functools.partial(BNStats, fused=fused)
    try:
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            S.synthesize(model, os.path.join(d, "s.pt"), (1, 28, 28), num_images=256,
                         batch_size=256, steps=steps, progress=False, device=device)
            return (time.perf_counter() - t) / steps
    finally:
        if old[0] is None:
            os.environ.pop("SYNQ_BACKEND")
        else:
            os.environ["SYNQ_BACKEND"] = old[0]
        S.CPU_CHANNELS_LAST, S.BNStats = old[1], old[2]


def run(quick: bool = False, device: str = "cpu", out_dir: str = "benchmarks/results"):
    others = [b for b in sk.available_backends("channel_stats", device) if b != "reference"]
    if device == "cpu":  # Triton on CPU tensors is the interpreter: not a benchmark
        others = [b for b in others if b != "triton"]
    gpu = device != "cpu"
    rounds, mrt = (1, 0.5) if gpu else ((2, 0.2) if quick else (3, 0.5))
    rows = []
    layouts = [("", torch.contiguous_format), (" channels-last", torch.channels_last)]
    cases = [(name + tag, shape, fmt) for name, shape in (QUICK if quick and not gpu else SHAPES)
             for tag, fmt in layouts]
    for name, shape, fmt in cases:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
        x = x.contiguous(memory_format=fmt).requires_grad_(True)
        cands = [(be, kind, fn(x, be)) for be in ["reference"] + others
                 for kind, fn in (("forward", _fwd), ("forward+backward", _fwd_bwd))]
        if not gpu and "cpu" in others and fmt is torch.channels_last:
            c = shape[1]
            p = (torch.zeros(c), torch.ones(c), torch.ones(c), torch.zeros(c))
            cands += [("batchnorm + channel_stats", "BN + stats fwd+bwd", _bn_separate(x, p)),
                      ("batch_norm_stats", "BN + stats fwd+bwd", _bn_fused(x, p))]
        runs = [[] for _ in cands]
        for _ in range(rounds):
            for i, (_, _, fn) in enumerate(cands):
                runs[i].append(time_fn(fn, device, mrt))
        base = {kind: min(ts) for (be, kind, _), ts in zip(cands, runs)
                if be in ("reference", "batchnorm + channel_stats")}
        for (be, kind, _), ts in zip(cands, runs):
            t = min(ts)
            rows.append({"what": f"{name} {'x'.join(map(str, shape))}", "pass": kind,
                         "backend": "torch.var_mean" if be == "reference" else be,
                         "ms": t * 1e3, "GB/s read": x.numel() * 4 / t / 1e9,
                         "speedup_vs_torch": base[kind] / t})
        print(markdown_table(rows[-len(cands):]), flush=True)
    steps = 3 if quick else 6
    # (label, channel_stats backend, channels-last model on the CPU); the first is the
    # plain-PyTorch baseline, the last what synthesize runs by default
    configs = [("torch.var_mean", "reference", False)] + [(be, be, False) for be in others]
    if not gpu and others:
        if others[0] == "cpu":
            configs.append(("cpu, channels-last model, BN unfused", "cpu", True, False))
        configs.append((f"{others[0]}, channels-last model", others[0], True))
    runs = {c: [] for c in configs}
    for _ in range(2):
        for c in configs:
            runs[c].append(_synthesis_step_seconds(c[1], steps, device, *c[2:]))
    base = min(runs[configs[0]])
    for c, ts in runs.items():
        rows.append({"what": "synthesis step, bundled resnet20, 256x1x28x28", "pass": "Adam step",
                     "backend": c[0], "ms": min(ts) * 1e3, "GB/s read": "",
                     "speedup_vs_torch": base / min(ts)})
    print(markdown_table(rows[-len(runs):]), flush=True)
    threads = torch.get_num_threads()
    notes = (f"torch threads: {threads}. ms: the fastest of {rounds} interleaved round(s) "
             "(each a median); 'torch.var_mean' is the reference backend (var_mean over "
             "(B, H, W) and PyTorch autograd); 'batchnorm + channel_stats' is F.batch_norm (eval) "
             "and the cpu channel_stats as separate ops, the baseline of the fused "
             "batch_norm_stats rows. GB/s read counts one read of x. The synthesis "
             f"rows time {steps} Adam steps of synq.synth.synthesize, fastest of 2 rounds; "
             "on a CPU synthesize runs a channels-last copy of the model by default "
             "(synq.synth.CPU_CHANNELS_LAST), the other rows a model as given (NCHW).")
    write_results("channel_stats", rows, device, out_dir, notes,
                  suffix="" if gpu else f"_{threads}t")
    return rows


if __name__ == "__main__":
    bench_main(run, __doc__)

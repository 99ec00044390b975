"""Exported W8A8 models at batch 1 with the static quantization on the CPU kernel (one pass,
Hardswish fused in) against the former PyTorch ops (the reference, swapped in), alternating in
one process (five rounds of 100 forwards each, best kept, replay re-recorded at each switch),
1 thread:
    python static_quant_ab.py ROOT TORCHVISION_DIR [MODEL ...]"""
import sys, time
ROOT = sys.argv[1]
sys.path.insert(0, ROOT)
sys.path.insert(1, sys.argv[2])
import torch
torch.set_num_threads(1)
import synq
assert synq.__file__.startswith(ROOT), synq.__file__
sys.path.insert(0, ROOT + "/benchmarks/results/cpu_2026-11-28g")
from torchvision_models import build
from synq.deploy import export
from synq.quant import calibrate, quantize_model
from synq_kernels.ops import quantize as Q
from synq_kernels.reference import quantize as R

kernel = Q.quantize_static
for name in sys.argv[3:] or ["mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"]:
    m = build(name)
    x = torch.randn(4, 3, 96, 96)
    im = export(calibrate(quantize_model(m, 8, 8), [x]), example=x[:1])
    x1 = torch.randn(1, 3, 224, 224)
    res = {"kernel": [], "ops": []}
    outs = {}
    with torch.no_grad():
        for r in range(5):
            for mode in ("kernel", "ops"):
                Q.quantize_static = kernel if mode == "kernel" else (
                    lambda x, s, z, lo, hi, act=0: R.quantize_static(x, s, z, lo, hi, act))
                im.reset_replay()
                for _ in range(3):
                    outs[mode] = im(x1)
                t0 = time.perf_counter()
                for _ in range(100):
                    im(x1)
                res[mode].append((time.perf_counter() - t0) / 100 * 1e3)
    Q.quantize_static = kernel
    k, o = min(res["kernel"]), min(res["ops"])
    print(f"{name}: kernel {k:.3f} ms, PyTorch ops {o:.3f} ms ({o / k:.2f}x); same outputs: "
          f"{torch.equal(outs['kernel'], outs['ops'])}", flush=True)

"""DenseNet-121 (torchvision, random weights, W8A8, batch 1, 224x224, 1 thread): the exported
model with its float BatchNorms applied in the quantization pass of the ReLU after them
(FloatBatchNorm2d.defer, the default) against the same model with those BatchNorms run by
ATen and the ReLU and quantization after them, alternating in one process:
    python bn_quant_ab.py TORCHVISION_DIR [ROUNDS]"""
import sys
import time

import torch

sys.path.insert(0, sys.argv[1])
sys.path.insert(0, "benchmarks/results/cpu_2026-11-28f")
from torchvision_models import build  # noqa: E402

from synq.deploy import FloatBatchNorm2d, export  # noqa: E402
from synq.quant import calibrate, quantize_model  # noqa: E402


def median_ms(fn, n=20):
    fn()
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


def main():
    torch.set_num_threads(1)
    m = build("densenet121")
    x = torch.randn(4, 3, 96, 96)
    q = calibrate(quantize_model(m, 8, 8), [x])
    im = export(q, example=x[:1])
    bns = [b for b in im.model.modules() if isinstance(b, FloatBatchNorm2d)]
    deferred = [b for b in bns if b.defer]
    print(f"{len(bns)} float BatchNorms, {len(deferred)} applied in the next quantization")
    x1 = torch.randn(1, 3, 224, 224)

    def setting(on):
        for b in deferred:
            b.defer = on
        im.reset_replay()

    with torch.no_grad():
        setting(True)
        a = im(x1)
        setting(False)
        b = im(x1)
        print(f"outputs: max |fused - ATen BN| / max |ATen BN| = "
              f"{float((a - b).abs().max() / b.abs().max()):.2e}")
        for r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
            row = []
            for on in (False, True):
                setting(on)
                row.append(median_ms(lambda: im(x1)))
            print(f"round {r}: ATen BN {row[0]:.2f} ms, in the quantization {row[1]:.2f} ms, "
                  f"{row[0] / row[1]:.2f}x")


if __name__ == "__main__":
    main()

"""Which torchvision classifiers synq quantizes and exports (random weights; BatchNorm
statistics set by a train-mode forward of random images, as a trained model would have its
own), how close the exported model follows its fake-quantized model, and the batch-1 latency
of the exported W8A8 model against the fp32 one (channels-last, BatchNorm folded), 1 thread:
    python torchvision_models.py TORCHVISION_DIR [MODEL ...]
TORCHVISION_DIR: where torchvision is installed (it is not a dependency of synq).

Random networks are chaotic under quantization: the column "fq, 8-bit input" shows how much
the fake-quantized model's own logits move when only its input image is rounded to 8 bits
(the exported model's first conv does that), to read the export's difference against."""
import copy
import sys
import time

import torch
from torch.fx.experimental.optimization import fuse

from synq.deploy import _dynamic_grid, export
from synq.quant import calibrate, quantize_model

NAMES = ["resnet50", "mobilenet_v2", "vgg11_bn", "regnet_x_400mf", "shufflenet_v2_x0_5",
         "squeezenet1_1", "googlenet", "densenet121", "mobilenet_v3_small", "mobilenet_v3_large",
         "efficientnet_b0"]


def build(name):
    """torchvision's `name` with random weights (seed 0) and the BatchNorm statistics of its own
    activations on random images (torchvision must be importable)."""
    import torchvision.models as tvm
    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    m = getattr(tvm, name)(weights=None, **kw)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    with torch.no_grad():
        m(torch.randn(16, 3, 96, 96))
    return m.eval()


def median_ms(fn, n=20):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def main():
    torch.set_num_threads(1)
    print("| model | export | export vs fq | fq, 8-bit input, vs fq | fp32 ms | int W8A8 ms | speedup |")
    print("|---|---|---|---|---|---|---|")
    for name in sys.argv[2:] or NAMES:
        m = build(name)
        x = torch.randn(4, 3, 96, 96)
        try:
            q = calibrate(quantize_model(m, 8, 8), [x])
            im = export(q, example=x[:1])
        except Exception as e:  # noqa: BLE001 - the refusal is the result
            print(f"| {name} | refused: {type(e).__name__}: {str(e)[:160]} | | | | | |")
            continue
        s, z = _dynamic_grid(x, (0, 1, 2, 3))
        x8 = (torch.clamp(torch.round(x / s) + z, -128, 127) - z) * s
        with torch.no_grad():
            fq, fq8, out = q(x), q(x8), im(x)
            x1 = torch.randn(1, 3, 224, 224)
            try:
                fast = fuse(copy.deepcopy(m))
            except Exception:  # noqa: BLE001 - untraceable: channels-last only
                fast = copy.deepcopy(m)
            fast = fast.to(memory_format=torch.channels_last)
            x1c = x1.contiguous(memory_format=torch.channels_last)
            tf = median_ms(lambda: fast(x1c))
            ti = median_ms(lambda: im(x1))
        print(f"| {name} | yes | {rel(out, fq):.3f} | {rel(fq8, fq):.3f} | {tf:.2f} | {ti:.2f} | "
              f"{tf / ti:.2f}x |")


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])  # torchvision
    main()

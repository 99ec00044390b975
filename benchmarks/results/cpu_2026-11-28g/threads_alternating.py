"""An exported W8A8 model at batch 1: ms per forward at 1 and 2 threads, four rounds
alternating inside one process (torch.set_num_threads switched between rounds):
    python threads_alternating.py ROOT [resnet20 | resnet18 | mobilenetv2]"""
import sys, time
ROOT = sys.argv[1]
sys.path.insert(0, ROOT)
import torch
from synq.assets import load_default_teacher
from synq.deploy import export
from synq.quant import calibrate, quantize_model
from synq import replay
torch.manual_seed(0)
name = sys.argv[2] if len(sys.argv) > 2 else "resnet20"
if name == "resnet20":
    model, shape = load_default_teacher()[0].eval(), (1, 28, 28)
else:
    from benchmarks.bench_train import random_bn
    from synq.models import mobilenet_v2, resnet18
    model = random_bn((resnet18 if name == "resnet18" else mobilenet_v2)(num_classes=1000)).eval(); shape = (3, 224, 224)
calib = torch.randn(8, *shape)
im = export(calibrate(quantize_model(model, 8, 8), [calib]), example=calib[:1])
x = torch.randn(1, *shape)
for _ in range(3): im(x)
n = 3000 if name == "resnet20" else 200
res = {1: [], 2: []}
for r in range(4):
    for nt in (1, 2):
        torch.set_num_threads(nt)
        for _ in range(20): im(x)
        t0 = time.perf_counter()
        for _ in range(n): im(x)
        res[nt].append((time.perf_counter() - t0) / n * 1e3)
print(name, {k: " ".join(f"{v:.3f}" for v in vs) for k, vs in res.items()})

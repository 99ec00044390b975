"""An exported W8A8 model's forward, median over about 2 s of calls:
    python model_threads.py ROOT NTHREADS MODEL BATCH
MODEL: resnet20 | resnet18 | mobilenetv2; ROOT as in conv_threads.py."""
import sys, time
root, nt, name, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
sys.path.insert(0, root)
import torch
torch.set_num_threads(nt)
from benchmarks.bench_train import random_bn
from synq.assets import load_default_teacher
from synq.deploy import export
from synq.models import mobilenet_v2, resnet18
from synq.quant import calibrate, quantize_model
import synq_kernels as sk; assert sk.__file__.startswith(root)
torch.manual_seed(0)
if name == "resnet20":
    model, shape = load_default_teacher()[0].eval(), (1, 28, 28)
else:
    model = random_bn((resnet18 if name == "resnet18" else mobilenet_v2)(num_classes=1000)).eval()
    shape = (3, 224, 224)
calib = torch.randn(8, *shape)
im = export(calibrate(quantize_model(model, 8, 8), [calib]), example=calib[:1])
x = torch.randn(batch, *shape)
n = max(20, int(2.0 / (0.0004 if name == "resnet20" else 0.004) / batch))
with torch.no_grad():
    for _ in range(10): im(x)
    ts = []
    for _ in range(n):
        t = time.perf_counter(); im(x); ts.append(time.perf_counter() - t)
ts.sort(); print(f"{root[-5:]} {name} b{batch} {nt}t: {ts[len(ts)//2]*1e3:.3f} ms")

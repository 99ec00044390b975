"""A/B of exported-model latency between two checkouts (a build change):
    python model_ab.py ROOT MODEL BATCH [ROUNDS]
ROOT: a checkout with its extension built in place; MODEL: resnet18 | mobilenetv2 | resnet20.
Prints the median forward time (1 thread) of the W8A8 exported model and of the fp32 model;
run it for each ROOT in turn, alternating, on a quiet machine."""
import sys
from _timing import median_us

root, name, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 5
sys.path.insert(0, root)
import torch  # noqa: E402

torch.set_num_threads(1)
from benchmarks.bench_train import random_bn  # noqa: E402
from synq.assets import load_default_teacher  # noqa: E402
from synq.deploy import export  # noqa: E402
from synq.models import mobilenet_v2, resnet18  # noqa: E402
from synq.quant import calibrate, quantize_model  # noqa: E402

torch.manual_seed(0)
if name == "resnet20":
    model, shape = load_default_teacher()[0].eval(), (1, 28, 28)
else:
    model = random_bn((resnet18 if name == "resnet18" else mobilenet_v2)(num_classes=1000))
    model, shape = model.eval(), (3, 224, 224)
calib = torch.randn(8, *shape)
im = export(calibrate(quantize_model(model, 8, 8), [calib]), example=calib[:1])
x = torch.randn(batch, *shape)


with torch.no_grad():
    ti = median_us(lambda: im(x), rounds, warm=2) / 1e3
    tf = median_us(lambda: model(x), rounds, warm=2) / 1e3
print(f"{root} {name} b{batch}: int W8A8 {ti:.2f} ms, fp32 {tf:.2f} ms, {tf / ti:.2f}x")

"""As same_outputs.py, for synq's MobileNetV2 and ResNet-18 (random weights and BatchNorm
statistics, 100 classes, 64x64), W8A8 and W4A4, at batch 3 and three calls at batch 1:
    python same_outputs_mbv2_r18.py ROOT OUT.pt"""
import sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from benchmarks.bench_train import random_bn
from synq.deploy import export
from synq.models import mobilenet_v2, resnet18
from synq.quant import calibrate, quantize_model
import synq; assert synq.__file__.startswith(sys.argv[1])
outs = []
for f in (mobilenet_v2, resnet18):
    torch.manual_seed(0)
    model = random_bn(f(num_classes=100)).eval()
    calib = torch.randn(4, 3, 64, 64)
    for bits in (8, 4):
        im = export(calibrate(quantize_model(model, bits, bits), [calib]), example=calib[:1])
        x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            outs += [im(x), im(x[:1]), im(x[:1]), im(x[:1])]
torch.save(outs, sys.argv[2])

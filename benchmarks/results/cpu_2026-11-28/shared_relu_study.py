"""The bundled ResNet-20 rewired as torchvision writes its blocks (one ReLU module called after
the first conv and again after the residual add), quantized with one range for both calls (the
behaviour before 2026-11-28) and with a range per call (now), calibrated only and after SynQ
fine-tuning with the main job's settings. Run after `synq quantize --out RUN` (it reads
RUN/synthetic.pt and RUN/summary.json):

    python benchmarks/results/cpu_2026-11-28/shared_relu_study.py RUN
"""
import dataclasses
import json
import sys
import types
import warnings

import torch

import synq.quant as Q
from synq.assets import load_default_teacher
from synq.data.fashion_mnist import fashion_mnist_dataset
from synq.evaluate import evaluate
from synq.finetune import FinetuneConfig, finetune
from synq.models.resnet_cifar import BasicBlock
from synq.synth import load_synthetic

run = sys.argv[1]
torch.set_num_threads(2)
model, _ = load_default_teacher()


def shared_forward(self, x):  # torchvision's pattern: one ReLU module, called twice
    out = self.relu1(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu1(self.add(out, self.shortcut(x)))


for m in model.modules():
    if isinstance(m, BasicBlock):
        m.forward = types.MethodType(shared_forward, m)
        del m.relu2
test = fashion_mnist_dataset("test")
syn = load_synthetic(f"{run}/synthetic.pt").tensors[0]
saved = json.load(open(f"{run}/summary.json"))["finetune_config"]
names = {f.name for f in dataclasses.fields(FinetuneConfig)}
cfg = FinetuneConfig(**{k: tuple(v) if isinstance(v, list) else v
                        for k, v in saved.items() if k in names})
print("float (shared-ReLU copy)", evaluate(model, test)["top1"])
per_call = Q._activation_calls
modes = (("one range per module (before)", lambda m: {}), ("a range per call (now)", per_call))
for bits in (4, 6, 8):
    for label, calls in modes:
        Q._activation_calls = calls
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = Q.quantize_model(model, bits, bits)
            Q.calibrate(q, syn.split(64))
        print(f"W{bits}A{bits} calibrated only, {label}: {evaluate(q, test)['top1']:.2f}")
Q._activation_calls = per_call
orig, _ = load_default_teacher()
q = Q.quantize_model(orig, 4, 4)
Q.calibrate(q, syn.split(64))
print("bundled model (a ReLU module per call), W4A4 calibrated only:", evaluate(q, test)["top1"])
for label, calls in modes:
    Q._activation_calls = calls
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = finetune(model, f"{run}/synthetic.pt", cfg, progress=False)
    print(f"W4A4 SynQ fine-tuned, {label}: {evaluate(res.student, test)['top1']:.2f}")

"""Outputs of the bundled ResNet-20 exported at W8A8, W6A6 and W4A4 (with and without a fixed
input range), at batch 37 and three calls at batch 1 (eager, recorded, replayed), saved for
comparison between two checkouts:
    python same_outputs.py ROOT OUT.pt
then torch.equal on each pair of the two files' tensors."""
import sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from synq.assets import load_default_teacher
from synq.deploy import export
from synq.quant import calibrate, quantize_model
import synq
assert synq.__file__.startswith(sys.argv[1])
torch.manual_seed(0)
model = load_default_teacher()[0].eval()
calib = torch.randn(8, 1, 28, 28)
outs = []
for bits in (8, 6, 4):
    for rng in (None, (-0.5, 2.5)):
        im = export(calibrate(quantize_model(model, bits, bits), [calib]), example=calib[:1], input_range=rng)
        x = torch.randn(37, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            outs.append(im(x)); outs.append(im(x[:1])); outs.append(im(x[:1])); outs.append(im(x[:1]))
torch.save(outs, sys.argv[2])

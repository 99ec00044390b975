"""The ops torchvision's ShuffleNetV2 x0.5, exported W8A8 (random weights, BatchNorm statistics
from a train-mode forward), replays at batch 1 (224x224), counted by kind:
    python shufflenet_ops.py ROOT TORCHVISION_DIR"""
import collections
import sys

ROOT = sys.argv[1]
sys.path.insert(0, ROOT)
sys.path.insert(1, sys.argv[2])
import torch  # noqa: E402

import synq  # noqa: E402
from synq import replay  # noqa: E402
from synq.deploy import export  # noqa: E402
from synq.quant import calibrate, quantize_model  # noqa: E402
from torchvision_models import build  # noqa: E402 (this folder's)

assert synq.__file__.startswith(ROOT), synq.__file__
torch.set_num_threads(1)
m = build("shufflenet_v2_x0_5")
x = torch.randn(4, 3, 96, 96)
im = export(calibrate(quantize_model(m, 8, 8), [x]), example=x[:1])
with torch.no_grad():
    _, rec, why = replay.record(lambda t: im(t), torch.randn(1, 3, 224, 224))
print(len(rec.steps), "replayed ops", why or "")
for k, v in collections.Counter(str(st.op) for st in rec.steps).most_common():
    print(v, k)

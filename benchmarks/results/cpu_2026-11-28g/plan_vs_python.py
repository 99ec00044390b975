"""The exported model's replay by the C++ plan against the Python loop, in one process,
alternating (five rounds each, the best kept), 1 thread:
    python plan_vs_python.py ROOT [resnet20 | resnet18 | mobilenetv2]"""
import sys, time
ROOT = sys.argv[1]
sys.path.insert(0, ROOT)
import torch
torch.set_num_threads(1)
from synq.assets import load_default_teacher
from synq.deploy import export
from synq.quant import calibrate, quantize_model
from synq import replay
import synq
assert synq.__file__.startswith(ROOT), synq.__file__
name = sys.argv[2] if len(sys.argv) > 2 else "resnet20"
torch.manual_seed(0)
if name == "resnet20":
    model, shape = load_default_teacher()[0].eval(), (1, 28, 28)
else:
    from benchmarks.bench_train import random_bn
    from synq.models import mobilenet_v2, resnet18
    model = random_bn((resnet18 if name == "resnet18" else mobilenet_v2)(num_classes=1000)).eval(); shape = (3, 224, 224)
calib = torch.randn(8, *shape)
for bits in (8, 4):
    im = export(calibrate(quantize_model(model, bits, bits), [calib]), example=calib[:1])
    for b in (1, 32):
        x = torch.randn(b, *shape)
        want = im.model(x)
        for _ in range(3): im(x)
        rec = im._recordings[replay.input_key(x)][0]
        plan = rec.plan
        assert plan is not None and len(plan) == len(rec.steps)
        assert torch.equal(im(x), want)
        n = 2000 if b == 1 else 100
        if name != "resnet20": n //= 10
        res = {"cpp": [], "py": []}
        for r in range(5):
            for mode in ("cpp", "py"):
                rec.plan = plan if mode == "cpp" else None
                t0 = time.perf_counter()
                for _ in range(n): im(x)
                res[mode].append((time.perf_counter() - t0) / n * 1e3)
        rec.plan = plan
        c, p = min(res["cpp"]), min(res["py"])
        print(f"{name} W{bits}A{bits} b{b}: {len(rec.steps)} steps  C++ plan {c:.4f} ms  Python replay {p:.4f} ms  ({p / c:.2f}x)", flush=True)

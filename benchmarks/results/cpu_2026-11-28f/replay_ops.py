"""The ops an exported W8A8 model replays at batch 1, and the time of each kind (each replayed
call timed on its own, 2000 forwards, 1 thread):
    python replay_ops.py ROOT [resnet20 | resnet18 | mobilenetv2]"""
import sys, time, collections
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
with torch.no_grad():
    out, rec, why = replay.record(lambda t: im(t), x)
print(len(rec.steps), "steps")
c = collections.Counter(str(st.op) for st in rec.steps)
for k, v in c.most_common(): print(v, k)
# time each op kind within replay
import time
env_t = collections.defaultdict(float)
with torch.no_grad():
    for _ in range(50): rec(x)
    N = 2000
    # instrument
    env = None
    tot = collections.defaultdict(float)
    for it in range(N):
        envl = [None] * rec.n_slots; envl[0] = x
        for st in rec.steps:
            args, kwargs = st.args, st.kwargs
            if st.dyn:
                args = list(args)
                for j, s in st.dyn: args[j] = envl[s]
            t0 = time.perf_counter()
            out = st.func(*args, **kwargs)
            tot[str(st.op)] += time.perf_counter() - t0
            if isinstance(st.outs, int): envl[st.outs] = out
            elif st.outs is not None:
                from torch.utils import _pytree as pytree
                for o, t in zip(pytree.tree_leaves(st.outs), pytree.tree_leaves(out)):
                    if isinstance(o, int): envl[o] = t
            for s in st.free: envl[s] = None
for k, v in sorted(tot.items(), key=lambda kv: -kv[1]):
    print(f"{v / N * 1e6:8.1f} us  {k}")
print(f"{sum(tot.values()) / N * 1e6:.1f} us in op calls")
print("----")
for k, st in enumerate(rec.steps):
    if "conv2d_packed" in str(st.op): continue
    sh = [tuple(a.shape) if isinstance(a, torch.Tensor) else ("slot" if type(a).__name__ == "_Slot" else a) for a in st.args]
    print(k, st.op, str(sh)[:150])

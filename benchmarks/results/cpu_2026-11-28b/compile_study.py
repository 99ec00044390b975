"""One-off: a W4A4 ResNet-20 training step (student only, batch 256, 32x32, channels-last, one
thread) eager against torch.compile (inductor), and the exported integer ResNet-18 (2x3x64x64)
replayed against inductor. Not a benchmark of the library's loops (finetune does not compile);
it backs the numbers in the README's notes on torch.compile.

    python benchmarks/results/cpu_2026-11-28b/compile_study.py
"""
import time

import torch

from synq import quant
from synq.deploy import export
from synq.models import get_model

torch.set_num_threads(1)
torch.manual_seed(0)
q = quant.quantize_model(get_model("resnet20"), 4, 4).to(memory_format=torch.channels_last)
x = torch.randn(256, 3, 32, 32).to(memory_format=torch.channels_last)
quant.calibrate(q, [x[:32]])
q.train()


def step(run):
    q.zero_grad()
    run(x).square().mean().backward()


c = torch.compile(q)
t = time.time()
step(c)
step(c)
print(f"training step: compile + 2 steps {time.time() - t:.1f} s", flush=True)
for name, run in (("eager", q), ("inductor", c)) * 2:
    t = time.time()
    for _ in range(3):
        step(run)
    print(f"training step {name}: {(time.time() - t) / 3 * 1e3:.0f} ms", flush=True)

torch._dynamo.reset()
m = get_model("resnet18")
qm = quant.quantize_model(m, 8, 8)
xi = torch.randn(2, 3, 64, 64)
quant.calibrate(qm, [xi])
qm.eval()
im = export(qm, xi[:1])
with torch.no_grad():
    want = im(xi)
    ci = torch.compile(im, fullgraph=True)
    got = ci(xi)
    print("integer resnet18: inductor max abs diff", (got - want).abs().max().item())
    for name, run in (("replayed", im), ("inductor", ci)) * 2:
        for _ in range(3):
            run(xi)
        t = time.perf_counter()
        for _ in range(20):
            run(xi)
        print(f"integer resnet18 {name}: {(time.perf_counter() - t) / 20 * 1e3:.2f} ms")

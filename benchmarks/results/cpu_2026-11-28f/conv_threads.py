"""Single packed convs at batch 1 (int8 -> int8, ReLU), median of 600 calls:
    python conv_threads.py ROOT NTHREADS
ROOT: a checkout with its extension built in place (alternate ROOTs between processes)."""
import sys, time
root, nt = sys.argv[1], int(sys.argv[2]); sys.path.insert(0, root)
import torch
import synq_kernels as sk
assert sk.__file__.startswith(root), sk.__file__
torch.set_num_threads(nt)
op = torch.ops.synq._quantized_conv2d_packed
g = torch.Generator().manual_seed(0)
def t_us(fn, n=600):
    for _ in range(30): fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[len(ts)//2] * 1e6
out = []
for c, co, hw, k in [(16,16,28,3),(16,16,56,3),(32,32,28,3),(64,64,14,3),(128,128,7,3),(64,64,28,3),(64,64,56,3),(256,256,14,3),(512,512,7,3),(64,256,56,1),(256,64,56,1),(32,96,56,1),(96,24,56,1),(144,24,56,1),(24,144,56,1)]:
    w = torch.randint(-127, 127, (co, c, k, k), dtype=torch.int8, generator=g)
    wp = sk.prepack_conv2d_weight(w, 1)
    ws = torch.rand(co, generator=g) * 0.01 + 0.001; bias = torch.randn(co, generator=g)
    x = torch.randint(-128, 127, (1, c, hw, hw), dtype=torch.int8, generator=g).contiguous(memory_format=torch.channels_last)
    xs, xz = torch.tensor([0.02]), torch.tensor([3], dtype=torch.int32)
    os_, oz = torch.tensor([0.05]), torch.tensor([-128], dtype=torch.int32)
    p = k // 2
    f = lambda: op(x, xs, xz, wp, ws, bias, [1, 1], [p, p], [1, 1], 1, True, torch.int8, os_, oz, None, None, None, None, None)
    out.append(f"{c}->{co}@{hw}k{k} {t_us(f):.1f}")
print(root[-5:], f"{nt}t", " | ".join(out))

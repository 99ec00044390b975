"""Stem convs, int8 out, 1 thread: python stem_ab.py ROOT (a checkout with its extension built
in place); run for the old and the new checkout in turn. NCHW input, as an exported model's
image arrives."""
import sys, time
root=sys.argv[1]; sys.path.insert(0, root)
import torch, synq_kernels as sk
torch.set_num_threads(1)
from _timing import median_us  # noqa: E402
def t(f, n=15):
    return median_us(f, n, warm=2) / 1e3
g=torch.Generator().manual_seed(0)
out=[]
for (B,cin,cout,k,s,p,hw) in [(256,1,16,3,1,1,28),(1,3,64,7,2,3,224),(1,3,32,3,2,1,224)]:
    w = torch.randint(-127,127,(cout,cin,k,k),dtype=torch.int8, generator=g)
    wp = sk.prepack_conv2d_weight(w)
    ws = torch.rand(cout, generator=g)*0.01+0.001
    x = torch.randint(-128,127,(B,cin,hw,hw),dtype=torch.int8, generator=g)
    f=lambda: sk.quantized_conv2d_packed(x, 0.02, 3, wp, ws, stride=s, padding=p, relu=True, out_dtype=torch.int8, out_scale=0.05, out_zero=-128)
    out.append(f"b{B} {cin}->{cout} k{k}s{s} {hw}: {t(f):.3f} ms")
print(root.split('/')[-1], " | ".join(out))

"""ResNet-18's 7x7 stride-2 stem (int8 out, NCHW input) at batch B, 1 thread, without and with
weight offsets (W8A8 rows beyond int8: the window sums): python stem_offsets_time.py B."""
import sys, time
import torch, synq_kernels as sk
torch.set_num_threads(1)
from _timing import median_us  # noqa: E402
def t(f, n=7):
    return median_us(f, n, warm=2) / 1e3
g=torch.Generator().manual_seed(0)
B=int(sys.argv[1]); reps=int(sys.argv[2]) if len(sys.argv)>2 else 0
for (cin,cout,k,s,p,hw) in [(3,64,7,2,3,224)]:
    w = torch.randint(-127,127,(cout,cin,k,k),dtype=torch.int8, generator=g)
    wp = sk.prepack_conv2d_weight(w)
    ws = torch.rand(cout, generator=g)*0.01+0.001
    x = torch.randint(-128,127,(B,cin,hw,hw),dtype=torch.int8, generator=g)
    off = torch.randint(-3,3,(cout,),dtype=torch.int32, generator=g)
    for wo in (None, off):
        f=lambda: sk.quantized_conv2d_packed(x, 0.02, 3, wp, ws, stride=s, padding=p, relu=True, out_dtype=torch.int8, out_scale=0.05, out_zero=-128, w_offset=wo)
        if reps and wo is not None:
            for _ in range(reps): f()
        elif not reps:
            print("offset" if wo is not None else "none", f"{t(f):.3f} ms")

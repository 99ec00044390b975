"""MobileNetV2's 3x3 depthwise convs at batch 1, 1 thread: int8 (int8 out, ReLU) against fp32
F.conv2d, channels-last and NCHW."""
import torch, time, synq_kernels as sk
import torch.nn.functional as F
torch.set_num_threads(1)
from _timing import median_us  # noqa: E402
def t(f, n=30):
    return median_us(f, n)
g=torch.Generator().manual_seed(0)
for (c,hw,s) in [(32,112,1),(96,112,2),(144,56,1),(144,56,2),(192,28,1),(384,14,1),(576,14,1),(960,7,1)]:
    w = torch.randint(-127,127,(c,1,3,3),dtype=torch.int8, generator=g)
    wp = sk.prepack_conv2d_weight(w, c)
    ws = torch.rand(c, generator=g)*0.01+0.001
    x = torch.randint(-128,127,(1,c,hw,hw),dtype=torch.int8, generator=g).contiguous(memory_format=torch.channels_last)
    xf = x.float()
    wf = w.float()
    xfn = xf.contiguous()
    ti = t(lambda: sk.quantized_conv2d_packed(x, 0.02, 3, wp, ws, stride=s, padding=1, groups=c, relu=True, out_dtype=torch.int8, out_scale=0.05, out_zero=-128))
    tf = t(lambda: F.conv2d(xf, wf, None, s, 1, 1, c))
    tfn = t(lambda: F.conv2d(xfn, wf, None, s, 1, 1, c))
    print(f"dw c{c} {hw}x{hw} s{s}: int {ti:.1f} us, fp32 CL {tf:.1f} us, fp32 NCHW {tfn:.1f} us, ratio {min(tf,tfn)/ti:.2f}")

"""Depthwise 3x3 / 5x5 packed convs (int8 in and out, ReLU, channels-last, batch 1, 1 thread) at
channel counts that are and are not multiples of 16: the int16 image that these convs build
was widened channel by channel for C % 16 != 0 before the change (dw_widen.log: both runs).
    python dw_widen.py"""
import torch, time
import synq_kernels as sk
torch.set_num_threads(1)
def t(fn, n=50):
    fn(); fn()
    s = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - s) / n * 1e6
for C, H, k, s in [(64,56,3,1),(72,56,3,1),(80,56,3,1),(96,56,3,1),(128,28,3,1),(184,14,3,1),(192,14,3,1),(120,28,5,1),(128,28,5,1)]:
    x = torch.randint(-128,127,(1,C,H,H),dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    w = torch.randint(-128,127,(C,1,k,k),dtype=torch.int8)
    wp = sk.prepack_conv2d_weight(w, C)
    ws = torch.rand(C)*0.01+0.001
    us = t(lambda: sk.quantized_conv2d_packed(x, 0.02, -3, wp, ws, None, stride=s, padding=k//2, groups=C, relu=True, out_dtype=torch.int8, out_scale=0.1, out_zero=-100))
    n = C*H*H//(s*s)
    print(f"C{C:4d} {H}x{H} k{k} s{s}: {us:7.1f} us  {n/us:6.1f} outputs/us")

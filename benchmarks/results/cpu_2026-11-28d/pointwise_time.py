"""One 1x1 int8 conv (int8 out, ReLU) against fp32 F.conv2d on channels-last input, 1 thread:
python pointwise_time.py CIN COUT HW [REPS (for perf: no timing)]."""
import torch, time, synq_kernels as sk, sys
torch.set_num_threads(1)
g=torch.Generator().manual_seed(0)
cin,cout,hw = [int(v) for v in sys.argv[1:4]]; reps=int(sys.argv[4]) if len(sys.argv)>4 else 0
w = torch.randint(-127,127,(cout,cin,1,1),dtype=torch.int8, generator=g)
wp = sk.prepack_conv2d_weight(w)
ws = torch.rand(cout, generator=g)*0.01+0.001
x = torch.randint(-128,127,(1,cin,hw,hw),dtype=torch.int8, generator=g).contiguous(memory_format=torch.channels_last)
f=lambda: sk.quantized_conv2d_packed(x, 0.02, 3, wp, ws, relu=True, out_dtype=torch.int8, out_scale=0.05, out_zero=-128)
if reps:
    for _ in range(reps): f()
else:
    for _ in range(3): f()
    ts=[]
    for _ in range(50):
        s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
    us = sorted(ts)[25]*1e6
    xf = x.float(); wf = w.float()
    for _ in range(3): torch.nn.functional.conv2d(xf, wf)
    ts=[]
    for _ in range(50):
        s=time.perf_counter(); torch.nn.functional.conv2d(xf, wf); ts.append(time.perf_counter()-s)
    print(f"{cin}->{cout} {hw}: int {us:.1f} us ({cin*cout*hw*hw/us/1e3:.0f} GMAC/s), fp32 CL {sorted(ts)[25]*1e6:.1f} us")

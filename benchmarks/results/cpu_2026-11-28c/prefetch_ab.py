"""Side-by-side timing of the few-row CPU GEMM kernels before / after the weight prefetch.

    python prefetch_ab.py ROOT   (ROOT: a checkout whose synq_kernels/_C is built)

Best-of-30 ms of synq int8_matmul and int4_matmul (W4A8) at M = 1-16 rows, and
torch._int_mm at 17 rows for scale, on a 4096^2 weight (16 MB, fits this CPU's 32 MB L3), an
11008 x 4096 one (45 MB: streams from memory) and a 1000 x 2048 one. 1 thread."""
import sys, torch, time
sys.path.insert(0, sys.argv[1])
import synq_kernels as sk
torch.set_num_threads(1)
def best(f,n=30):
    f(); t=1e9
    for _ in range(n):
        s=time.perf_counter(); f(); t=min(t,time.perf_counter()-s)
    return t*1e3
for N,K in ((4096,4096),(11008,4096),(1000,2048)):
  w=torch.randint(-128,128,(N,K),dtype=torch.int8); pw=sk.pack_int4(torch.randint(-8,8,(N,K),dtype=torch.int8))
  for M in (1,2,4,8,16):
    a=torch.randint(-128,128,(M,K),dtype=torch.int8)
    a8=torch.randint(-128,128,(max(M,17),K),dtype=torch.int8)
    print(N,K,M,"int8 %.3f"%best(lambda: sk.int8_matmul(a,w)),"w4a8 %.3f"%best(lambda: sk.int4_matmul(a,pw)), "_int_mm(M=17) %.3f"%best(lambda: torch._int_mm(a8,w.T)))

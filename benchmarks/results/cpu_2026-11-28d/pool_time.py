"""int8 max-pool 3x3 / 2, pad 1, of a channels-last 64x112x112 int8 tensor at batch 1 and 32,
1 thread: the float32 round trip synq.deploy used before against synq_kernels.max_pool2d_int8."""
import torch, time, synq_kernels as sk
import torch.nn.functional as F
torch.set_num_threads(1)
from _timing import median_us  # noqa: E402
def t(f, n=30):
    return median_us(f, n)
for B in (1, 32):
    x = torch.randint(-128,127,(B,64,112,112),dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    print(B, "float path us", t(lambda: F.max_pool2d(x.float(),3,2,1).to(torch.int8), 5 if B>1 else 30), "cpu kernel us", t(lambda: sk.max_pool2d_int8(x,3,2,1)))

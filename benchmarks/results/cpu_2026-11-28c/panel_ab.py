"""Side-by-side timing of the CPU int GEMM before / after the panel kernel.

    python panel_ab.py ROOT THREADS   (ROOT: a checkout whose synq_kernels/_C is built)

Prints one line per shape: best-of-7 ms of synq int8_matmul, int4_matmul (W4A8),
quantized_linear (int8 weights, row sums precomputed, float32 out), torch._int_mm (M > 16) and fp32 torch.matmul,
all in this process. Run it alternately on two checkouts."""
import sys
import time

sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402

import synq_kernels as sk  # noqa: E402

torch.set_num_threads(int(sys.argv[2]))
torch.manual_seed(0)


def best(f, n=7):
    f()
    t = 1e9
    for _ in range(n):
        s = time.perf_counter()
        f()
        t = min(t, time.perf_counter() - s)
    return t * 1e3


print("root", sys.argv[1], "threads", torch.get_num_threads(), "module", sk.__file__)
for n, k in [(4096, 4096), (1000, 2048), (512, 512)]:
    for m in (16, 24, 32, 64, 96, 128, 256, 1024):
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        pb = sk.pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8))
        ws = torch.rand(n) * 0.01
        rs = b.sum(1, dtype=torch.int32)  # precomputed, as the exporter does
        af, bf = a.float(), b.float()
        r = {
            "int8": best(lambda: sk.int8_matmul(a, b, backend="cpu")),
            "w4a8": best(lambda: sk.int4_matmul(a, pb, backend="cpu")),
            "linear": best(lambda: sk.quantized_linear(a, 0.02, 3, b, ws, w_rowsum=rs,
                                                            backend="cpu")),
            "_int_mm": best(lambda: torch._int_mm(a, b.T)) if m > 16 else float("nan"),
            "fp32": best(lambda: af @ bf.T, 3),
        }
        print(f"{m}x{n}x{k} " + " ".join(f"{key} {v:.3f}" for key, v in r.items()), flush=True)

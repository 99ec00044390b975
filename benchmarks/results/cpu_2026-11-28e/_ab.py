"""The shared start of this folder's A/B scripts: `python SCRIPT ROOT` times the extension
built in place in checkout ROOT, 1 thread, with the earlier folder's timing helper. Returns
(torch, synq_kernels, median_us, the packed conv op)."""
import sys
from pathlib import Path


def start():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cpu_2026-11-28d"))
    from _timing import median_us
    sys.path.insert(0, sys.argv[1])
    import torch
    import synq_kernels as sk
    torch.set_num_threads(1)
    return torch, sk, median_us, torch.ops.synq._quantized_conv2d_packed.default

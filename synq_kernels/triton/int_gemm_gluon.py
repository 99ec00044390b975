"""int8 x int8 -> int32 GEMM for Hopper (sm_90) in Gluon, Triton's lower-level language:
the triton backend's int8_matmul with `SYNQ_GLUON_GEMM=1` (opt-in: compiled for sm_90 ahead
of time here, not yet run on a GPU).

Why: Triton's software pipeliner keeps an int8 `tl.dot` synchronous (it makes a dot
asynchronous only when its accumulator is float32; triton-lang/triton,
WGMMAPipeline.cpp, "Rule 2.1"), so int_gemm.py's kernel waits for every wgmma before it
issues the next K block's. Here the schedule is written out:

- TMA copies A (M, K) and B (N, K) tiles into a ring of STAGES shared-memory buffers, each
  signalled by its own mbarrier; out-of-range rows and columns arrive as zeros, so ragged M,
  N and K need no masks (zeros add nothing to the sums), and TMA clips the store of C;
- one asynchronous wgmma (int8, int32 accumulator, both operands from shared memory, B as
  the K-major view its (N, K) layout already is) stays in flight: after issuing block k the
  program waits until only that one is outstanding, which frees block k - 1's buffers for
  the copy of block k + STAGES - 1;
- programs run in L2 groups of GROUP_M row tiles, as in int_gemm.py.

TMA needs 16-byte aligned row strides and base addresses: K a multiple of 16 and N of 4
(int32 C); `usable` says when a call qualifies, and int_gemm.int_mm runs its own kernel
otherwise.
"""
from __future__ import annotations

import os

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # a Triton without Gluon (before 3.4)
    gluon = None

MIN_M = 64  # below this the tile is mostly padding; int_gemm.py's small tiles do better


def enabled() -> bool:
    return os.environ.get("SYNQ_GLUON_GEMM", "0") == "1" and gluon is not None


def usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether int8_matmul(a, b) can run here: sm_90 (wgmma; sm_100 has other MMAs),
    contiguous int8 operands, TMA's 16-byte alignment of rows and bases."""
    if gluon is None or not a.is_cuda or torch.cuda.get_device_capability(a.device) != (9, 0):
        return False
    m, k = a.shape
    n = b.shape[0]
    return (a.dtype == torch.int8 and b.dtype == torch.int8 and a.is_contiguous()
            and b.is_contiguous() and m >= MIN_M and k % 16 == 0 and n % 4 == 0
            and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0)


if gluon is not None:
    @triton.constexpr_function
    def _warps_per_cta(bm, num_warps):
        # the wgmma atom is 4 warps along M (16 rows each); more warps tile M while it has
        # rows for them, then N
        w = [4, 1]
        while w[0] * w[1] != num_warps:
            if bm > 16 * w[0]:
                w[0] *= 2
            else:
                w[1] *= 2
        return w

    @triton.constexpr_function
    def _instr_n(bm, bn, num_warps):
        # int8 wgmma takes N from this list; the largest that divides the warp's share of BN
        m_reps = -(-bm // 16)
        n_reps = -(-num_warps // m_reps)
        max_n = max(bn // n_reps, 8)
        for n in (256, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 24, 16, 8):
            if n <= max_n and bn % n == 0:
                return n
        raise ValueError(f"no int8 wgmma N for a {bm}x{bn} tile on {num_warps} warps")

    @gluon.jit
    def _gemm_s8_kernel(a_desc, b_desc, c_desc, M, N, K,
                        STAGES: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr):
        BM: gl.constexpr = c_desc.block_type.shape[0]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        NBYTES: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes

        pid = gl.program_id(0)
        n_m = gl.cdiv(M, BM)
        n_n = gl.cdiv(N, BN)
        width = GROUP_M * n_n
        first_m = (pid // width) * GROUP_M
        rows = gl.minimum(n_m - first_m, GROUP_M)
        off_m = (first_m + (pid % width) % rows) * BM
        off_n = ((pid % width) // rows) * BN

        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)

        mma: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=_warps_per_cta(BM, num_warps),
            instr_shape=[16, _instr_n(BM, BN, num_warps), 32])
        acc = gl.zeros((BM, BN), dtype=gl.int32, layout=mma)

        n_k = gl.cdiv(K, BK)
        for s in gl.static_range(STAGES - 1):  # the first blocks' copies
            ok = s < n_k
            mbarrier.expect(bars.index(s), NBYTES, pred=ok)
            tma.async_copy_global_to_shared(a_desc, [off_m, s * BK], bars.index(s),
                                            a_bufs.index(s), pred=ok)
            tma.async_copy_global_to_shared(b_desc, [off_n, s * BK], bars.index(s),
                                            b_bufs.index(s), pred=ok)
        for kb in range(n_k):
            cur = kb % STAGES
            mbarrier.wait(bars.index(cur), (kb // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(cur), b_bufs.index(cur).permute((1, 0)), acc,
                                is_async=True)
            # block kb - 1's wgmma is done after this: its buffers take block kb + STAGES - 1
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            nxt = kb + STAGES - 1
            ok = nxt < n_k
            t = nxt % STAGES
            mbarrier.expect(bars.index(t), NBYTES, pred=ok)
            tma.async_copy_global_to_shared(a_desc, [off_m, nxt * BK], bars.index(t),
                                            a_bufs.index(t), pred=ok)
            tma.async_copy_global_to_shared(b_desc, [off_n, nxt * BK], bars.index(t),
                                            b_bufs.index(t), pred=ok)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))

        c_smem = gl.allocate_shared_memory(gl.int32, [BM, BN], c_desc.layout)
        c_smem.store(acc)
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)
        tma.store_wait(pendings=0)


def _config(m: int, n: int, k: int) -> dict:
    """Launch parameters: 128 x 128 tiles (two warpgroups of 64 rows), K blocks of 128, four
    stages (128 KB of shared memory; C's staging buffer reuses it), L2 groups of 8 row
    tiles. Untimed: benchmarks/bench_gemm_tiles.py sweeps alternatives on a GPU."""
    return dict(BM=128, BN=128, BK=128, STAGES=4, GROUP_M=8, num_warps=8)


def layouts(cfg: dict):
    """The shared-memory layouts of the A, B and C tiles (TMA and wgmma read them)."""
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    return (gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8),
            gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8),
            gl.NVMMASharedLayout.get_default_for([bm, bn], gl.int32))


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (N, K).T in int32; `usable(a, b)` must hold."""
    m, k = a.shape
    n = b.shape[0]
    cfg = _config(m, n, k)
    c = torch.empty(m, n, dtype=torch.int32, device=a.device)
    la, lb, lc = layouts(cfg)
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    a_desc = TensorDescriptor(a, [m, k], [k, 1], [bm, bk], la)
    b_desc = TensorDescriptor(b, [n, k], [k, 1], [bn, bk], lb)
    c_desc = TensorDescriptor(c, [m, n], [n, 1], [bm, bn], lc)
    grid = (-(-m // bm) * -(-n // bn),)
    _gemm_s8_kernel[grid](a_desc, b_desc, c_desc, m, n, k, STAGES=cfg["STAGES"],
                          GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"])
    return c

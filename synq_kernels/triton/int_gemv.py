"""Packed int4 weights at a few rows of activations (M <= GEMV_MAX_M, batch-1 inference) in
Triton: the small-M path of the triton `synq::int_mm` (int4_matmul, W4A8 and W4A4).

At M = 1 the product is a matrix-vector one: it streams the weight once and does 2 N K
integer operations, far from the tensor cores' rate, so its speed is the rate at which the
weight arrives. The MMA kernel of int_gemm.py is built for the opposite: its 16-row tiles at
M = 1 are 15/16 padding, and a 4096-row weight gives it 32 programs for 132 SMs (it ran
0.19x fp16 at 1 x 4096 x 4096 on an H100, its packed loads then also unpipelined). Here one
program owns BN = 16 weight rows of one activation row (256 programs at N = 4096 and M = 1;
at M > 1 the programs of the other rows read the weight again, from L2) and walks K in
blocks of 2 BKH values: BKH bytes of each weight row (16-byte cp.async copies, STAGES in
flight), split into the low nibbles (even k) and high nibbles (odd k) with their sign, times
the activations at the even and odd k. The products pile up elementwise in a BN x BKH int32
block, summed over K once at the end, so the loop has no cross-thread reduction. Exact:
int32 throughout, like every int_mm backend.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .conv_tap import _block
from .int4_ptx import unpack_signed

# Rows of activations up to which int_mm with a packed weight takes this kernel.
GEMV_MAX_M = 4

# On a GPU, int8 activations: four weight bytes ($4) unpacked (int4_ptx.py) and multiplied by
# the four activations at the even k ($5) and the four at the odd k ($6) in two dp4a, added to
# the first of the four accumulators ($7; the other three pass through). The elementwise
# int32 code took 1080 instructions per step of BKH = 512 (8.4 per k; sm_90 SASS), about the
# time the weight takes to arrive at batch 1.
DOT8_ASM = tl.constexpr("{\n.reg .b32 t, lo, hi;\n" + unpack_signed("$4", "lo", "hi", "t")
                        + "dp4a.s32.s32 $0, lo, $5, $7;\ndp4a.s32.s32 $0, hi, $6, $0;\n"
                        "mov.b32 $1, $8;\nmov.b32 $2, $9;\nmov.b32 $3, $10;\n}")


@triton.jit
def _int_gemv_kernel(a_ptr, b_ptr, c_ptr, N, K, KH, sam, sbn, scm,
                     A_PACKED: tl.constexpr, A_SIGNED: tl.constexpr, ASM: tl.constexpr,
                     BN: tl.constexpr, BKH: tl.constexpr, STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    arow = a_ptr + tl.program_id(1) * sam  # one activation row per program
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    acc = tl.zeros([BN, BKH], dtype=tl.int32)
    for h0 in tl.range(0, KH, BKH, num_stages=STAGES):
        rh = h0 + tl.arange(0, BKH)  # byte h holds k = 2h (low nibble) and 2h + 1 (high)
        h_ok = rh < KH
        odd_ok = 2 * rh + 1 < K  # the high nibble of an odd K's last byte is padding
        q = tl.load(b_ptr + rn[:, None] * sbn + rh[None, :],
                    mask=n_ok[:, None] & h_ok[None, :], other=0)
        if ASM and not A_PACKED:  # (odd_ok zeroes the activation an odd K's pad nibble meets)
            a_e = tl.load(arow + 2 * rh, mask=h_ok, other=0)
            a_o = tl.load(arow + 2 * rh + 1, mask=odd_ok, other=0)
            acc = tl.inline_asm_elementwise(
                DOT8_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r",
                [q, tl.broadcast_to(a_e[None, :], [BN, BKH]),
                 tl.broadcast_to(a_o[None, :], [BN, BKH]), acc],
                dtype=tl.int32, is_pure=True, pack=4)
        else:
            q = q.to(tl.int32)
            lo = q & 0xF
            hi = (q >> 4) & 0xF
            lo = lo - ((lo & 8) << 1)
            hi = tl.where(odd_ok[None, :], hi - ((hi & 8) << 1), 0)
            if A_PACKED:
                p = tl.load(arow + rh, mask=h_ok, other=0).to(tl.int32)
                a_e = p & 0xF
                a_o = (p >> 4) & 0xF
                if A_SIGNED:
                    a_e = a_e - ((a_e & 8) << 1)
                    a_o = a_o - ((a_o & 8) << 1)
            else:
                a_e = tl.load(arow + 2 * rh, mask=h_ok, other=0).to(tl.int32)
                a_o = tl.load(arow + 2 * rh + 1, mask=odd_ok, other=0).to(tl.int32)
            acc += a_e[None, :] * lo + a_o[None, :] * hi
    tl.store(c_ptr + tl.program_id(1) * scm + rn, tl.sum(acc, axis=1), mask=n_ok)


def _gemv_config(n: int, kh: int, interp: bool) -> dict:
    """BN = 16 weight rows x BKH bytes of K per step (a 64-register accumulator per thread at
    4 warps), STAGES copies in flight. Not yet timed on a GPU: benchmarks/bench_gemm_tiles.py
    sweeps alternatives."""
    if interp:  # few, large programs under the interpreter
        return dict(BN=_block(n, 16, 64), BKH=_block(kh, 16, 256), STAGES=1, num_warps=4)
    return dict(BN=16, BKH=512, STAGES=3, num_warps=4)


def int_gemv(a, b, k, a_packed, a_signed):
    """a (M, K) int8 or packed int4 (M, ceil(K / 2)) uint8, M <= GEMV_MAX_M; b packed signed
    int4 (N, ceil(K / 2)); returns a @ b.T as int32 (M, N)."""
    a = a.contiguous()
    b = b.contiguous()
    m, n, kh = a.shape[0], b.shape[0], b.shape[1]
    c = torch.empty(m, n, dtype=torch.int32, device=a.device)
    if c.numel() == 0:
        return c
    cfg = _gemv_config(n, kh, a.device.type == "cpu")
    grid = (triton.cdiv(n, cfg["BN"]), m)
    _int_gemv_kernel[grid](a, b, c, n, k, kh, a.stride(0), b.stride(0), c.stride(0),
                           A_PACKED=a_packed, A_SIGNED=a_signed, ASM=a.device.type != "cpu",
                           **cfg)
    return c

"""Integer GEMM in Triton: the "triton" backend of `synq_kernels.int8_matmul` and
`int4_matmul` (the `synq::int_mm` op). quantized_linear / quantized_conv2d have no Triton
backend yet.

One program owns a BM x BN tile of C = A @ B.T and walks K in blocks of BK with tl.dot on
int8 operands and int32 accumulation (int8 tensor-core MMA on sm_80+). Packed int4 operands
(two per byte, element 2i in the low nibble) are loaded as BK/2 bytes per row and unpacked to
int8 in registers (nibble split, sign fix, interleave with tl.join), so they cost 4 bits of
memory traffic; Hopper has no int4 MMA. Ragged M, N and K are handled by masked loads (zeros
add nothing to the sums).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backends


# No @triton.jit helpers: they are slow under the interpreter (as in fake_quant.py).
@triton.jit
def _int_mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sam, sbn, scm,
                   A_PACKED: tl.constexpr, A_SIGNED: tl.constexpr, B_PACKED: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for k0 in range(0, K, BK):
        if A_PACKED:
            rh = k0 // 2 + tl.arange(0, BK // 2)
            p = tl.load(a_ptr + rm[:, None] * sam + rh[None, :],
                        mask=m_ok[:, None] & (rh[None, :] < (K + 1) // 2), other=0)
            p = p.to(tl.int32)
            lo = p & 0xF
            hi = (p >> 4) & 0xF
            if A_SIGNED:
                lo = lo - ((lo & 8) << 1)
                hi = hi - ((hi & 8) << 1)
            a = tl.join(lo, hi).reshape(BM, BK).to(tl.int8)
            # The pad nibble of an odd K is masked through b (zero past K).
        else:
            rk = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + rm[:, None] * sam + rk[None, :],
                        mask=m_ok[:, None] & (rk[None, :] < K), other=0)
        if B_PACKED:
            rh = k0 // 2 + tl.arange(0, BK // 2)
            q = tl.load(b_ptr + rn[:, None] * sbn + rh[None, :],
                        mask=n_ok[:, None] & (rh[None, :] < (K + 1) // 2), other=0)
            q = q.to(tl.int32)
            lo = q & 0xF
            hi = (q >> 4) & 0xF
            lo = lo - ((lo & 8) << 1)
            hi = hi - ((hi & 8) << 1)
            rk = k0 + tl.arange(0, BK)
            b = tl.join(lo, hi).reshape(BN, BK)
            b = tl.where(rk[None, :] < K, b, 0).to(tl.int8)
        else:
            rk = k0 + tl.arange(0, BK)
            b = tl.load(b_ptr + rn[:, None] * sbn + rk[None, :],
                        mask=n_ok[:, None] & (rk[None, :] < K), other=0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def int_mm(a, b, k, a_packed, a_signed, b_packed):
    a = a.contiguous()
    b = b.contiguous()
    m, n = a.shape[0], b.shape[0]
    c = torch.empty(m, n, dtype=torch.int32, device=a.device)
    if a.device.type == "cpu":  # interpreter: few, large programs
        bm, bn, bk = 64, 64, 64
    else:
        bm = 16 if m <= 16 else (64 if m <= 64 else 128)
        bn, bk = 128, 128
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _int_mm_kernel[grid](a, b, c, m, n, k, a.stride(0), b.stride(0), c.stride(0),
                         A_PACKED=a_packed, A_SIGNED=a_signed, B_PACKED=b_packed,
                         BM=bm, BN=bn, BK=bk)
    return c


backends.register("int_mm", "triton", int_mm)

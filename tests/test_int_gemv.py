"""synq_kernels.triton.int_gemv: the small-M path of the triton int_mm for packed int4 weights
(W4A8 and W4A4 at M <= GEMV_MAX_M), exact against the test's own int64 product."""
import pytest
import torch

import synq_kernels as sk

from test_int_gemm import TRITON, TRITON_GPU, exact, rand_i4, rand_i8


def gemv_cases(backend, device, monkeypatch):
    """M from 1 to GEMV_MAX_M, odd and even K, K over several blocks, N off the 16-row tile,
    signed and unsigned packed activations, the extremes, a set pad nibble, a strided
    activation view, empty shapes; and the int_mm dispatch sending these M here. Inputs made
    on the CPU, results compared there."""
    from synq_kernels.triton import int_gemm, int_gemv
    calls = []
    real = int_gemv.int_gemv
    monkeypatch.setattr(int_gemv, "int_gemv", lambda *a: calls.append(a[0].shape) or real(*a))
    d = torch.device(device)

    def int4_matmul(a, b, **kw):
        return sk.int4_matmul(a.to(d), b.to(d), backend=backend, **kw).cpu()
    for m, k, n in [(1, 1, 1), (1, 4097, 37), (2, 513, 16), (3, 30, 17), (4, 1100, 5)]:
        assert m <= int_gemv.GEMV_MAX_M
        b4 = rand_i4(n, k)
        pb = sk.pack_int4(b4)
        a = rand_i8(m, k)
        assert torch.equal(int4_matmul(a, pb).long(), exact(a, b4)), (m, k)
        for signed in (True, False):
            a4 = rand_i4(m, k, signed=signed)
            got = int4_matmul(sk.pack_int4(a4, signed), pb, k=k, a_signed=signed)
            assert torch.equal(got.long(), exact(a4, b4)), (m, k, n, signed)
    assert len(calls) == 15
    lo = torch.full((2, 301), -128, dtype=torch.int8)
    b4 = torch.full((19, 301), -8, dtype=torch.int8)
    got = int4_matmul(lo, sk.pack_int4(b4))
    assert torch.equal(got, torch.full((2, 19), 128 * 8 * 301, dtype=torch.int32))
    pb = sk.pack_int4(rand_i4(7, 301))  # odd K: a set pad nibble must add nothing
    pb_dirty = pb.clone()
    pb_dirty[:, -1] |= 0x70
    a = rand_i8(2, 301)
    assert torch.equal(int4_matmul(a, pb_dirty),
                       sk.int4_matmul(a, pb, backend="reference"))
    pa = sk.pack_int4(rand_i4(2, 301))
    pa_dirty = pa.clone()
    pa_dirty[:, -1] |= 0x50
    assert torch.equal(int4_matmul(pa_dirty, pb_dirty, k=301),
                       sk.int4_matmul(pa, pb, k=301, backend="reference"))
    wide = rand_i8(3, 2 * 77)
    b4 = rand_i4(9, 77)
    got = sk.int4_matmul(wide.to(d)[:, ::2], sk.pack_int4(b4).to(d), backend=backend).cpu()
    assert torch.equal(got.long(), exact(wide[:, ::2], b4))
    assert int_gemm.int_mm(rand_i8(0, 8).to(d), sk.pack_int4(b4[:, :8]).to(d), 8, False, True,
                           True).shape == (0, 9)
    got = int_gemm.int_mm(rand_i8(1, 0).to(d), torch.zeros(9, 0, dtype=torch.uint8, device=d),
                          0, False, True, True)
    assert torch.equal(got.cpu(), torch.zeros(1, 9, dtype=torch.int32))


@pytest.mark.parametrize("backend", TRITON)
def test_triton_gemv_path_exact(backend, monkeypatch):
    gemv_cases(backend, "cpu", monkeypatch)


@pytest.mark.parametrize("backend", TRITON_GPU)
def test_triton_cuda_gemv_path_exact(backend, monkeypatch):
    """The same on a GPU (compiled, not interpreted; skipped here)."""
    gemv_cases(backend, "cuda", monkeypatch)


_AOT_SCRIPT = r"""
import synq_kernels.triton.int_gemv as m

sig = {"a_ptr": "*i8", "b_ptr": "*u8", "c_ptr": "*i32", "N": "i32", "K": "i32", "KH": "i32",
       "sam": "i32", "sbn": "i32", "scm": "i32"}
for a_packed in (False, True):
    cfg = m._gemv_config(4096, 2048, False)
    warps = cfg.pop("num_warps")
    consts = dict(A_PACKED=a_packed, A_SIGNED=True, ASM=True, **cfg)
    ptx = build(m._int_gemv_kernel, dict(sig, a_ptr="*u8" if a_packed else "*i8"), consts,
                ["a_ptr", "b_ptr", "c_ptr", "K", "KH", "sam", "sbn", "scm"], num_warps=warps,
                cc=90)
    # the weight arrives in 16-byte asynchronous copies, software-pipelined
    assert re.search(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], (16|0x10)\b",
                     ptx), a_packed
    assert "cp.async.wait_group" in ptx, a_packed
    # int8 activations: the nibbles unpacked and multiplied four bytes at a time (dp4a)
    assert ("dp4a.s32.s32" in ptx) == (not a_packed), a_packed
print("ok")
"""


@pytest.mark.skipif(not TRITON, reason="triton is not installed")
def test_triton_gemv_compiles_for_sm90():
    """The interpreter hides GPU-only compile errors: the kernel compiled ahead of time for
    sm_90 (no GPU needed), its weight loads 16-byte cp.async copies
    in a software pipeline, and with int8 activations the products dp4a."""
    import triton_aot
    triton_aot.run(_AOT_SCRIPT)

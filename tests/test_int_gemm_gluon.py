"""synq_kernels.triton.int_gemm_gluon: the opt-in (SYNQ_GLUON_GEMM=1) Gluon int8 GEMM with
asynchronous wgmma for sm_90. Here (no GPU) it is compiled ahead of time and its PTX
checked; on a GPU it is compared exactly with the reference."""
import pytest
import torch

import synq_kernels as sk
from synq_kernels.reference import int_gemm as R

from isolated import in_child
from test_int_gemm import TRITON, rand_i8

_AOT_SCRIPT = r'''
from triton.experimental.gluon._runtime import GluonASTSource
from synq_kernels.triton import int_gemm_gluon as G

cfg = G._config(4096, 4096, 4096)
la, lb, lc = G.layouts(cfg)
sig = {"a_desc": f"tensordesc<i8[{cfg['BM']}, {cfg['BK']}],{la!r}>",
       "b_desc": f"tensordesc<i8[{cfg['BN']}, {cfg['BK']}],{lb!r}>",
       "c_desc": f"tensordesc<i32[{cfg['BM']}, {cfg['BN']}],{lc!r}>",
       "M": "i32", "N": "i32", "K": "i32", "STAGES": "constexpr", "GROUP_M": "constexpr",
       "num_warps": "constexpr"}
consts = {k: cfg[k] for k in ("STAGES", "GROUP_M", "num_warps")}
k = triton.compile(GluonASTSource(fn=G._gemm_s8_kernel, signature=sig, constexprs=consts),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"]})
ptx = k.asm["ptx"]
mma = re.findall(r"wgmma\.mma_async\S*", ptx)
# one K block: BK / 32 int8 wgmma instructions per warpgroup, int32 accumulators
assert len(mma) == cfg["BK"] // 32 and all(x.endswith("s32.s8.s8") for x in mma), mma
# asynchronous: the loop keeps one wgmma group in flight, the last wait drains it
assert "wgmma.wait_group.sync.aligned 1;" in ptx and "wgmma.wait_group.sync.aligned 0;" in ptx
# operands by TMA only (no register loads from global memory)
assert "cp.async.bulk.tensor" in ptx and "ld.global" not in ptx
# the buffers of block k - 1 are refilled only after every warpgroup has waited for its
# wgmma: a CTA barrier between the wait and the next TMA copy (two warpgroups share them)
after = ptx.split("wgmma.wait_group.sync.aligned 1;")[1]
assert after.index("bar.sync") < after.index("cp.async.bulk.tensor"), "no barrier before refill"
# the ring fits (227 KB per block on sm_90)
assert k.metadata.shared <= 227 * 1024, k.metadata.shared
print("ok")
'''


def test_gluon_gemm_compiles_for_sm90_without_gpu():
    pytest.importorskip("triton.experimental.gluon")
    import triton_aot
    triton_aot.run(_AOT_SCRIPT)


@pytest.mark.parametrize("backend", TRITON)
def test_gluon_switch_leaves_other_devices_alone(backend, monkeypatch):
    """SYNQ_GLUON_GEMM=1 where the kernel cannot run (CPU tensors under the interpreter):
    the usual kernel, exact."""
    from synq_kernels.triton import int_gemm_gluon as G
    monkeypatch.setenv("SYNQ_GLUON_GEMM", "1")
    a, b = rand_i8(64, 32), rand_i8(8, 32)
    assert not G.usable(a, b)
    assert torch.equal(sk.int8_matmul(a, b, backend=backend), R.int8_matmul(a, b))


def _sm90_gluon():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return False
    from synq_kernels.triton import int_gemm_gluon as G
    return G.gluon is not None and "triton" in sk.available_backends("int_mm", "cuda")


@pytest.mark.skipif(not _sm90_gluon(), reason="needs an sm_90 GPU, triton with Gluon")
def test_cuda_gluon_int8_matmul_exact(monkeypatch, request):
    """The Gluon kernel on the GPU, exact: ragged M and N around the 128 x 128 tile, K from
    one partial block to many (TMA's zero fill must add nothing), the extremes, and shapes
    it does not take (K not a multiple of 16, M below MIN_M) falling back, still exact."""
    if not in_child(request):  # never run on a GPU yet: a fault must fail this test alone
        return
    from synq_kernels.triton import int_gemm_gluon as G
    monkeypatch.setenv("SYNQ_GLUON_GEMM", "1")
    calls = []
    real = G.int8_matmul
    monkeypatch.setattr(G, "int8_matmul", lambda a, b: calls.append(a.shape) or real(a, b))
    cases = [(64, 16, 4), (65, 48, 100), (128, 128, 128), (300, 4096, 132), (1000, 272, 1000),
             (4100, 1024, 388)]
    for m, k, n in cases:
        a, b = rand_i8(m, k), rand_i8(n, k)
        got = sk.int8_matmul(a.cuda(), b.cuda(), backend="triton")
        assert torch.equal(got.cpu(), R.int8_matmul(a, b)), (m, k, n)
    assert len(calls) == len(cases)
    a = torch.full((256, 4096), -128, dtype=torch.int8)  # |sum| = 2^26: no overflow
    assert torch.equal(sk.int8_matmul(a.cuda(), a[:8].cuda(), backend="triton").cpu(),
                       torch.full((256, 8), 1 << 26, dtype=torch.int32))
    big = rand_i8(4096, 4096).cuda()
    assert torch.equal(sk.int8_matmul(big, big, backend="triton"), torch._int_mm(big, big.T))
    for m, k, n in [(64, 31, 8), (17, 64, 8)]:  # not taken: the usual kernel
        a, b = rand_i8(m, k), rand_i8(n, k)
        n_calls = len(calls)
        got = sk.int8_matmul(a.cuda(), b.cuda(), backend="triton")
        assert torch.equal(got.cpu(), R.int8_matmul(a, b)) and len(calls) == n_calls

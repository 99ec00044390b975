"""The triton fake_quant backend's own edge cases under the Triton interpreter (CPU): large
ties, special values, wider dy dtypes; and an ahead-of-time sm_90 compile of its kernels,
which the interpreter cannot stand in for. On a GPU machine the triton backend is tested on
CUDA tensors by test_fake_quant.py instead, so this module skips there; that includes the
ties, large-magnitude and special-value cases (test_rounding_ties_half_to_even,
test_rint_large_and_special_values, test_special_values_through_the_op), which run there for
every backend on every device against values computed with Python's round."""
import os

import pytest
import torch

if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton interpreter tests run only on CPU-only machines (tests/conftest.py)",
                allow_module_level=True)
pytest.importorskip("triton")

import synq_kernels  # noqa: E402

if synq_kernels.backends._triton_reason("cpu") is not None:  # e.g. an older interpreter
    pytest.skip(synq_kernels.backends._triton_reason("cpu"), allow_module_level=True)

from synq_kernels import reference  # noqa: E402
from synq_kernels.ops.fake_quant import quant_range  # noqa: E402
from synq_kernels.triton import fake_quant as tfq  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _params(x, axis, bits, signed, gen):
    c = 1 if axis < 0 else x.shape[axis]
    qmin, qmax = quant_range(bits, signed)
    amax = x.float().abs().amax() if x.numel() else torch.tensor(1.0)
    # Scales small enough that some elements clamp, large enough that most do not.
    s = (amax / (qmax - qmin) * (0.5 + torch.rand(c, generator=gen))).clamp_min(1e-3)
    zp = torch.rand(c, generator=gen) * (qmax - qmin) + qmin - 1.5  # some out of range
    if axis < 0:
        s, zp = s.reshape(()), zp.reshape(())
    return s.float(), zp.float(), qmin, qmax


def _check(x, axis, bits, signed, gen, grad_factor=0.7, dy=None):
    s, zp, qmin, qmax = _params(x, axis, bits, signed, gen)
    y_ref = reference.fake_quant_forward(x, s, zp, qmin, qmax, axis)
    y = tfq.fake_quant_forward(x, s, zp, qmin, qmax, axis)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(y.view(-1).view(torch.int16 if x.element_size() == 2 else torch.int32),
                       y_ref.contiguous().view(-1).view(
                           torch.int16 if x.element_size() == 2 else torch.int32)), \
        (y - y_ref).abs().max()
    if dy is None:
        dy = torch.randn(x.shape, generator=gen).to(x.dtype)
    dx_r, ds_r, dz_r = reference.fake_quant_backward(dy, x, s, zp, qmin, qmax, axis,
                                                     grad_factor, True)
    dx, ds, dz = tfq.fake_quant_backward(dy, x, s, zp, qmin, qmax, axis, grad_factor, True)
    assert torch.equal(dx, dx_r)
    assert ds.dtype == torch.float32 and ds.shape == s.shape
    assert dz.dtype == torch.float32 and dz.shape == zp.shape
    # Tolerance relative to the sum of |terms| of each reduction.
    xf, g = x.float(), dy.float()
    bshape = [1] * x.dim()
    if axis >= 0:
        bshape[axis] = -1
    sb = s.reshape(bshape)
    zb = torch.clamp(torch.round(zp.reshape(bshape)), qmin, qmax)
    t = xf / sb
    q = torch.round(t) + zb
    dims = [d for d in range(x.dim()) if d != axis] if axis >= 0 else list(range(x.dim()))
    mag_s = (g * (t.abs() + q.abs() + zb.abs())).abs().sum(dims).reshape(s.shape)
    mag_z = (g * sb).abs().sum(dims).reshape(zp.shape)
    assert ((ds - ds_r).abs() <= 1e-5 * abs(grad_factor) * mag_s + 1e-30).all(), (ds, ds_r)
    assert ((dz - dz_r).abs() <= 1e-5 * abs(grad_factor) * mag_z + 1e-30).all(), (dz, dz_r)
    # Without qparam gradients.
    dx2, ds2, dz2 = tfq.fake_quant_backward(dy, x, s, zp, qmin, qmax, axis, grad_factor, False)
    assert torch.equal(dx2, dx_r) and not ds2.any() and not dz2.any()


@pytest.mark.parametrize("n", [1, 7, 1023, 4097, 20000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_tensor(n, dtype):
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=gen) * 3).to(dtype)
    configs = [(2, True), (3, False), (4, True), (8, False), (8, True), (2, False)]
    for j in range(2):  # two bit widths per case, rotating through all of them
        bits, signed = configs[(n + 2 * DTYPES.index(dtype) + j) % len(configs)]
        _check(x, -1, bits, signed, gen)


@pytest.mark.parametrize("shape,axis", [((17, 33), 0), ((17, 33), 1), ((3, 5, 7, 9), 0),
                                        ((3, 5, 7, 9), 1), ((3, 5, 7, 9), 3),
                                        ((4, 300, 3), 1), ((2000, 3), 1), ((5, 600), 1),
                                        ((3, 5000), 0), ((1500, 2), 0), ((3, 2, 5000), 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_channel(shape, axis, dtype):
    gen = torch.Generator().manual_seed(sum(shape) + axis)
    x = (torch.randn(shape, generator=gen) * 2).to(dtype)
    configs = [(2, False), (4, True), (8, True), (3, True), (8, False)]
    bits, signed = configs[(sum(shape) + axis + DTYPES.index(dtype)) % len(configs)]
    _check(x, axis, bits, signed, gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 1])
def test_ties(dtype, axis):
    gen = torch.Generator().manual_seed(3)
    s_val = 0.25
    k = torch.arange(-100, 100, dtype=torch.float32)
    x = ((k + 0.5) * s_val).reshape(10, 20).to(dtype)  # exact ties, also for bf16/fp16
    assert torch.equal(x.float(), ((k + 0.5) * s_val).reshape(10, 20))
    qmin, qmax = quant_range(8, True)
    c = 1 if axis < 0 else 20
    s = torch.full((c,), s_val) if axis >= 0 else torch.tensor(s_val)
    zp = torch.full((c,), 2.5) if axis >= 0 else torch.tensor(-3.5)  # ties in z too
    y = tfq.fake_quant_forward(x, s, zp, qmin, qmax, axis)
    y_ref = reference.fake_quant_forward(x, s, zp, qmin, qmax, axis)
    assert torch.equal(y, y_ref)
    # Ties of large magnitude, without clamping (float32 only: bfloat16 cannot hold them).
    xw = ((k * 4001 + 0.5) * s_val).reshape(10, 20)
    y = tfq.fake_quant_forward(xw, s, zp, -2**22, 2**22, axis)
    y_ref = reference.fake_quant_forward(xw, s, zp, -2**22, 2**22, axis)
    assert torch.equal(y, y_ref)
    assert not torch.equal(y, xw)  # really rounded
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    dx, ds, dz = tfq.fake_quant_backward(dy, x, s, zp, qmin, qmax, axis, 1.0, True)
    dx_r, ds_r, dz_r = reference.fake_quant_backward(dy, x, s, zp, qmin, qmax, axis, 1.0, True)
    assert torch.equal(dx, dx_r)
    torch.testing.assert_close(ds, ds_r, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dz, dz_r, rtol=1e-5, atol=1e-4)


def test_rint_large_and_special():
    # |t| >= 2^23, inf and nan go through unchanged; halves near 2^23 round to even.
    vals = torch.tensor([8388607.5, 8388606.5, 8388608.0, 8388609.0, 1e30, -1e30, 0.5, 1.5,
                         2.5, -0.5, -1.5, -2.5, 4194303.5, float("inf"), float("-inf"),
                         float("nan"), -0.0, 1e-40, 0.49999997])
    s = torch.tensor(1.0)
    zp = torch.tensor(0.0)
    y = tfq.fake_quant_forward(vals, s, zp, -2**30, 2**30, -1)
    y_ref = reference.fake_quant_forward(vals, s, zp, -2**30, 2**30, -1)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    ok = torch.isnan(y_ref) | (y == y_ref)
    assert ok.all(), (y, y_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty(dtype):
    x = torch.empty(0, 5, dtype=dtype)
    s, zp = torch.ones(5), torch.zeros(5)
    y = tfq.fake_quant_forward(x, s, zp, 0, 255, 1)
    assert y.shape == x.shape
    dx, ds, dz = tfq.fake_quant_backward(x, x, s, zp, 0, 255, 1, 1.0, True)
    assert dx.shape == x.shape and ds.shape == (5,) and not ds.any() and not dz.any()
    y = tfq.fake_quant_forward(torch.empty(0), torch.tensor(1.0), torch.tensor(0.), 0, 3, -1)
    assert y.numel() == 0


def test_wider_dy():
    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(40, 30, generator=gen).to(dtype)
        _check(x, 1, 4, True, gen, dy=torch.randn(40, 30, generator=gen))
        _check(x, -1, 4, True, gen, dy=torch.randn(40, 30, generator=gen, dtype=torch.float64))


def test_non_contiguous():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(12, 10, 6, generator=gen)
    x = base.transpose(0, 2)[:, ::2]  # [6, 5, 12], strided
    assert not x.is_contiguous()
    _check(x, 1, 4, True, gen)
    _check(x, -1, 8, False, gen)
    dy = torch.randn(6, 1, 12, generator=gen).expand(6, 5, 12)
    _check(x, 2, 3, False, gen, dy=dy)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_public_api(axis):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, 40, 5, generator=gen)
    c = 1 if axis is None else x.shape[axis]
    s0 = torch.rand(c, generator=gen) * 0.1 + 0.05
    z0 = torch.rand(c, generator=gen) * 10
    if axis is None:
        s0, z0 = s0.reshape(()), z0.reshape(())
    outs = {}
    for be in ("triton", "reference"):
        xi = x.clone().requires_grad_()
        s = s0.clone().requires_grad_()
        z = z0.clone().requires_grad_()
        y = synq_kernels.fake_quant(xi, s, z, 4, signed=False, axis=axis, grad_factor=0.5,
                                    backend=be)
        (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
        outs[be] = (y.detach(), xi.grad, s.grad, z.grad)
    assert torch.equal(outs["triton"][0], outs["reference"][0])
    assert torch.equal(outs["triton"][1], outs["reference"][1])
    torch.testing.assert_close(outs["triton"][2], outs["reference"][2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["triton"][3], outs["reference"][3], rtol=1e-5, atol=1e-5)
    assert "triton" in synq_kernels.available_backends("fake_quant", "cpu")


_AOT_SCRIPT = r'''
import synq_kernels.triton.fake_quant as m


ptxs = []
for dt, (bo, bc, bi, cl), act in [("fp32", (1, 1, 4096, False), 1),
                                  ("bf16", (32, 128, 1, True), 2),
                                  ("fp16", (4, 64, 16, False), 0)]:
    consts = {"BLOCK_O": bo, "BLOCK_C": bc, "BLOCK_I": bi, "CHANNELS_LAST": cl, "INT64": False,
              "ROUND_BF16": dt == "bf16", "ACT": act}
    ptxs.append(build(m._fake_quant_fwd_kernel, {
        "x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "s_ptr": "*fp32", "z_ptr": "*fp32",
        "outer": "i32", "C": "i32", "inner": "i32", "n_cblocks": "i32", "tiles_inner": "i32",
        "qmin": "fp32", "qmax": "fp32"}, consts, ["x_ptr", "y_ptr", "C", "inner"], 8))
    ptxs.append(build(m._fake_quant_bwd_kernel, {
        "dy_ptr": "*fp32", "x_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "s_ptr": "*fp32",
        "z_ptr": "*fp32", "ps_ptr": "*fp32", "pz_ptr": "*fp32", "outer": "i64", "C": "i32",
        "inner": "i64", "n_cblocks": "i32", "tiles_inner": "i64", "n_tiles": "i64",
        "tiles_per_program": "i32", "qmin": "fp32", "qmax": "fp32", "grad_factor": "fp32"},
        dict(consts, QGRADS=True, INT64=True), ["x_ptr", "dx_ptr", "dy_ptr", "C", "inner"], 8))
build(m._sum_partials_kernel, {"ps_ptr": "*fp32", "pz_ptr": "*fp32", "ds_ptr": "*fp32",
      "dz_ptr": "*fp32", "K": "i32", "C": "i32"}, {"BLOCK_K": 32, "BLOCK_C": 128}, [], 4)
for j, ptx in enumerate(ptxs):
    assert "div.rn.f32" in ptx, j
    assert not re.search(r"div\.(full|approx)", ptx), j
    assert "0f4B000000" in ptx and "0fCB000000" in ptx, j  # the rounding's +- 2^23 survived
    assert "ld.global.v4" in ptx, j  # vectorized loads
print("ok")
'''


def test_compiles_for_sm90_without_gpu():
    # The interpreter hides GPU-only compile errors (e.g. div_rn does not broadcast), so the
    # kernels are also compiled ahead of time for sm_90, in a process without TRITON_INTERPRET.
    import triton_aot
    triton_aot.run(_AOT_SCRIPT)

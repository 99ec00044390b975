"""fake_quant: every backend against the plain-PyTorch reference, the reference against
torch's own learnable fake-quant ops and against a hand computation, autograd, errors."""
import pytest
import torch

import synq_kernels as sk
from synq_kernels import reference as R

from fake_quant_cases import assert_grads_close, make_inputs, qparam_grad_tolerance

CPU_BACKENDS = [b for b in ("cpu", "triton") if b in sk.available_backends("fake_quant", "cpu")]
GPU = torch.cuda.is_available()
GPU_BACKENDS = [b for b in ("cuda", "triton")
                if GPU and b in sk.available_backends("fake_quant", "cuda")]
CASES = [  # (shape, axis)
    ((1,), None), ((7,), None), ((1023,), None), ((4097,), None),
    ((17, 33), 0), ((17, 33), 1), ((17, 33), -1), ((3, 5, 7, 9), 0), ((3, 5, 7, 9), 1),
    ((2, 4, 6, 3), -1),
]
BITS = [(2, False), (3, True), (4, False), (8, True), (8, False)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_params():
    params = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in CPU_BACKENDS]
    params += [pytest.param(b, "cuda", id=f"{b}-cuda") for b in GPU_BACKENDS]
    if not GPU:
        params.append(pytest.param("cuda", "cuda", id="cuda-cuda",
                                   marks=pytest.mark.skip(reason="no CUDA GPU")))
    return params


def run_op(x, scale, zp, dy, bits, signed, axis, backend, grad_factor=1.0):
    x = x.clone().requires_grad_()
    scale = scale.clone().requires_grad_()
    zp = zp.clone().requires_grad_()
    y = sk.fake_quant(x, scale, zp, bits, signed=signed, axis=axis, grad_factor=grad_factor,
                      backend=backend)
    y.backward(dy)
    return y.detach(), x.grad, scale.grad, zp.grad


def check_against_reference(backend, device, shape, axis, dtype, bits, signed, seed=0,
                            grad_factor=0.75, transform=None):
    x, s, z, dy, qmin, qmax = make_inputs(shape, axis, dtype, bits, signed, device, seed)
    if transform is not None:  # a non-contiguous view of a larger tensor, fresh qparams
        x, dy = transform(x), transform(dy)
        _, s, z, _, _, _ = make_inputs(tuple(x.shape), axis, dtype, bits, signed, device, seed)
        assert not x.is_contiguous()
    got = run_op(x, s, z, dy, bits, signed, axis, backend, grad_factor)
    want = run_op(x, s, z, dy, bits, signed, axis, "reference", grad_factor)
    assert got[0].dtype == x.dtype and got[0].shape == x.shape
    assert torch.equal(got[0], want[0]), "forward differs from the reference"
    assert torch.equal(got[1], want[1]), "dx differs from the reference"
    tol_s, tol_z = qparam_grad_tolerance(dy, x, s, z, qmin, qmax, axis, grad_factor)
    assert_grads_close(got[2], want[2], tol_s, "d scale")
    assert_grads_close(got[3], want[3], tol_z, "d zero_point")
    assert got[2].shape == s.shape and got[3].shape == z.shape


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("bits,signed", BITS)
def test_backend_matches_reference_fp32(backend, device, shape, axis, bits, signed):
    check_against_reference(backend, device, shape, axis, torch.float32, bits, signed)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,axis", [((4097,), None), ((3, 5, 7, 9), 1), ((17, 33), -1)])
def test_backend_matches_reference_half(backend, device, dtype, shape, axis):
    check_against_reference(backend, device, shape, axis, dtype, 4, False, seed=3)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("transform", [lambda t: t.t(), lambda t: t[:, ::3],
                                       lambda t: t.transpose(0, 1)[2:]],
                         ids=["transposed", "strided", "sliced"])
def test_non_contiguous(backend, device, transform):
    check_against_reference(backend, device, (24, 31), 1, torch.float32, 4, False,
                            transform=transform)


@pytest.mark.parametrize("backend,device",
                         [pytest.param("reference", "cpu", id="reference-cpu")] + backend_params())
@pytest.mark.parametrize("axis", [None, 0, 1, 2, 3, -1])
@pytest.mark.parametrize("dy_layout", ["channels_last", "contiguous"])
def test_channels_last_input_gives_the_nchw_result_in_its_layout(backend, device, axis,
                                                                  dy_layout):
    """A channels-last x (a model in channels-last format) runs on its NHWC view: the same
    values as the NCHW tensor, outputs and dx channels-last, whatever dy's layout."""
    x, s, z, dy, _, _ = make_inputs((3, 5, 7, 9), axis, torch.float32, 4, False, device, 1)
    cl = torch.channels_last
    xcl = x.contiguous(memory_format=cl)
    dy2 = dy.contiguous(memory_format=cl) if dy_layout == "channels_last" else dy
    got = run_op(xcl, s, z, dy2, 4, False, axis, backend)
    want = run_op(x, s, z, dy, 4, False, axis, backend)
    assert got[0].is_contiguous(memory_format=cl) and not got[0].is_contiguous()
    assert got[1].is_contiguous(memory_format=cl)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for g, w in zip(got[2:], want[2:]):  # sums over the channel in another order
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("axis", [None, 1])
def test_empty_tensor(backend, device, axis):
    x = torch.randn(0, 5, device=device, requires_grad=True)
    scale = torch.full((1,) if axis is None else (5,), 0.1, device=device, requires_grad=True)
    zp = torch.zeros_like(scale, requires_grad=True)
    y = sk.fake_quant(x, scale, zp, 4, axis=axis, backend=backend)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(scale.grad, torch.zeros_like(scale))
    assert torch.equal(zp.grad, torch.zeros_like(zp))


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("bits,signed,zp", [(4, False, 3.0), (4, False, 4.0), (3, True, -1.0),
                                            (8, True, 0.0)])
def test_rounding_ties_half_to_even(backend, bits, signed, zp):
    """x exactly on the midpoint between two grid points rounds to the even integer; the
    expected values are computed here with Python's round (half to even), not the reference."""
    s = 0.125
    qmin, qmax = sk.quant_range(bits, signed)
    ks = torch.arange(qmin - 3, qmax + 3, dtype=torch.float32) - zp
    x = (ks + 0.5) * s
    y = sk.fake_quant(x, torch.tensor(s), torch.tensor(zp), bits, signed=signed, backend=backend)
    want = [(min(max(round(float(k) + 0.5) + zp, qmin), qmax) - zp) * s for k in ks.tolist()]
    assert y.tolist() == want


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("shape,axis", [((1023,), None), ((6, 7, 5), 1), ((9, 4), -1)])
def test_gradients_match_autograd_through_reference(backend, shape, axis):
    """The fused backward equals plain autograd through a straight-through-estimator
    formulation of the reference (independent of the hand-written backward)."""
    x, s, z, dy, qmin, qmax = make_inputs(shape, axis, torch.float32, 4, False, seed=7)
    got = run_op(x, s, z, dy, 4, False, axis, backend, grad_factor=0.5)
    xs, ss, zs = (t.clone().requires_grad_() for t in (x, s, z))
    ax = -1 if axis is None else axis % len(shape)
    R.fake_quant_ste(xs, ss, zs, qmin, qmax, ax, 0.5).backward(dy)
    # dx of the STE form is dy * (s * (1 / s)), one rounding away from dy.
    torch.testing.assert_close(got[1], xs.grad, rtol=2e-7, atol=0)
    tol_s, tol_z = qparam_grad_tolerance(dy, x, s, z, qmin, qmax, axis, 0.5)
    assert_grads_close(got[2], ss.grad, tol_s * 3, "d scale")
    assert_grads_close(got[3], zs.grad, tol_z * 3, "d zero_point")


def torch_learnable(x, s, z, qmin, qmax, axis, grad_factor):
    if axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, s.reshape(1), z.reshape(1), qmin, qmax, grad_factor)
    return torch._fake_quantize_learnable_per_channel_affine(x, s, z, axis, qmin, qmax,
                                                             grad_factor)


@pytest.mark.parametrize("shape,axis", [((4097,), None), ((8, 3, 5, 5), 0), ((8, 3, 5, 5), 1),
                                        ((33, 17), 1)])
@pytest.mark.parametrize("bits,signed", [(2, False), (4, False), (8, False), (4, True),
                                         (8, True)])
def test_reference_matches_torch_learnable_ops(shape, axis, bits, signed):
    """Scales are powers of two here so that torch's x * (1 / scale) equals our x / scale;
    zero points are integers so that torch's backward, which rounds x / scale + z as one
    number, agrees with its own forward. Gradients are compared for unsigned ranges only:
    torch's backward truncates a negative zero point instead of rounding it."""
    x, _, _, dy, qmin, qmax = make_inputs(shape, axis, torch.float32, bits, signed, seed=11)
    c = 1 if axis is None else shape[axis]
    g = torch.Generator().manual_seed(5)
    s = 2.0 ** -torch.randint(1, 6, (c,), generator=g).float()
    z = torch.randint(qmin, qmax + 1, (c,), generator=g).float()
    if axis is None:
        s, z = s.reshape(()), z.reshape(())
    ours = run_op(x, s, z, dy, bits, signed, axis, "reference", 0.5)
    xt, st, zt = (t.clone().requires_grad_() for t in (x, s, z))
    yt = torch_learnable(xt, st, zt, qmin, qmax, axis, 0.5)
    yt.backward(dy)
    assert torch.equal(ours[0], yt.detach())
    if signed:
        return
    assert torch.equal(ours[1], xt.grad)
    tol_s, tol_z = qparam_grad_tolerance(dy, x, s, z, qmin, qmax, axis, 0.5)
    assert_grads_close(ours[2], st.grad.reshape(s.shape), tol_s * 3, "d scale vs torch")
    assert_grads_close(ours[3], zt.grad.reshape(z.shape), tol_z * 3, "d zero_point vs torch")


@pytest.mark.parametrize("axis", [None, 0])
def test_reference_forward_matches_torch_random_scales(axis):
    """With arbitrary scales torch multiplies by 1 / scale instead of dividing, which moves
    an element across a rounding boundary only when x / scale lies within an ulp of a tie."""
    x, s, z, _, qmin, qmax = make_inputs((64, 257), axis, torch.float32, 8, False, seed=2)
    z = torch.round(z)
    ours = sk.fake_quant(x, s, z, 8, axis=axis, backend="reference")
    theirs = torch_learnable(x, s, z, qmin, qmax, axis, 1.0)
    step = s.max()
    diff = (ours - theirs).abs()
    assert bool((diff <= step * 1.0001).all())
    assert int((diff > 0).sum()) <= 3


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_qparam_grads_skipped_when_not_needed(backend):
    x = torch.randn(100, requires_grad=True)
    y = sk.fake_quant(x, torch.tensor(0.1), torch.tensor(3.0), 4, backend=backend)
    y.sum().backward()
    assert x.grad is not None


def test_matches_torch_for_scalar_qparams():
    x = torch.randn(50)
    y = sk.fake_quant(x, 0.125, 2, 4)
    want = torch.fake_quantize_per_tensor_affine(x, 0.125, 2, 0, 15)
    assert torch.equal(y, want)

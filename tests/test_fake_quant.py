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


def all_backend_params():
    """Every backend on every device: the reference, then backend_params() (ids "cpu-cpu",
    "triton-cpu" under the interpreter, "cuda-cuda" and "triton-cuda" on a GPU machine,
    where benchmarks/gpu_check.sh selects them by those names)."""
    return [pytest.param("reference", "cpu", id="reference-cpu")] + backend_params()


def _rne(v: float) -> float:
    """Python's round: half to even, computed apart from any backend; inf / nan kept."""
    return v if v != v or v in (float("inf"), float("-inf")) else float(round(v))


def _expected_fq(t: float, zp: float, qmin: int, qmax: int) -> float:
    """(clamp(round(t) + z, qmin, qmax) - z) in grid steps, z = clamp(round(zp)); for
    exact t (x / s with s a power of two) and exact results."""
    if t != t:
        return t
    z = min(max(_rne(zp), qmin), qmax)
    return min(max(_rne(t) + z, qmin), qmax) - z


def _representable(v: torch.Tensor, dtype) -> torch.Tensor:
    return v.to(dtype).to(v.dtype) == v


# The value tests below lay their values out in shapes that test_backend_matches_reference_*
# also use (4097 elements per tensor; (3, 5, 7, 9) per channel along dim 1), so that on a GPU
# the Triton kernels they need are already compiled (a new tile shape is a new compile).
PER_CHANNEL_SHAPE, PER_CHANNEL_AXIS = (3, 5, 7, 9), 1
CHANNEL_SCALES = [0.125, 0.25, 0.5, 0.0625, 1.0]   # powers of two: x / s exact


def _layout(n_values: int, axis):
    """Index into n_values values for each element of the test tensor (every value used, in
    every channel where there is room), and the element's channel."""
    if axis is None:
        idx = torch.arange(4097) % n_values
        return idx, torch.zeros(4097, dtype=torch.long)
    b, c, h, w = PER_CHANNEL_SHAPE
    per = b * h * w
    idx = (torch.arange(c * per) % n_values).reshape(c, b, h, w).transpose(0, 1)
    chan = torch.arange(c).reshape(1, c, 1, 1).expand(PER_CHANNEL_SHAPE)
    return idx, chan


def _channel_sum(v: torch.Tensor, chan: torch.Tensor, axis):
    """Per-channel (or total) sums of float64 terms, in the shape of the op's qparam grads."""
    sums = torch.zeros(5, dtype=torch.float64).index_add_(0, chan.reshape(-1), v.reshape(-1))
    return sums[:1].reshape(()) if axis is None else sums


@pytest.mark.parametrize("backend,device", all_backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, PER_CHANNEL_AXIS])
@pytest.mark.parametrize("bits,signed,zp", [(4, False, 3.0), (4, False, 4.0), (3, True, -1.0),
                                            (8, True, 0.0), (4, False, 2.5), (3, True, -2.5),
                                            (8, False, 6.5)])
def test_rounding_ties_half_to_even(backend, device, dtype, axis, bits, signed, zp):
    """x exactly on the midpoint between two grid points, from below the range to above it,
    rounds to the even integer; zero points on a midpoint (2.5, -2.5, 6.5) round to even
    too. Per tensor (scale 1/8) and per channel (scales CHANNEL_SCALES). The expected
    values, dx (ties at the range's ends decide the clamp) and the qparam gradients (exact
    sums of +-1/2, integers and steps with dy = 1) are computed here with Python's round,
    not with the reference."""
    qmin, qmax = sk.quant_range(bits, signed)
    zr = min(max(_rne(zp), qmin), qmax)
    ts = torch.arange(qmin - 3, qmax + 3, dtype=torch.float64) - zr + 0.5  # x / s: ties
    ts = ts[_representable(ts * 0.125, dtype)]  # bfloat16: 8 significant bits
    assert ts.numel() >= 6
    # per distinct t: the result in steps, inside the range?, the d scale term (dy = 1)
    q = [_rne(t) + zr for t in ts.tolist()]
    inside = torch.tensor([qmin <= v <= qmax for v in q])
    steps = torch.tensor([_expected_fq(t, zp, qmin, qmax) for t in ts.tolist()],
                         dtype=torch.float64)
    ds_term = torch.tensor([(v - zr - t) if i else (min(max(v, qmin), qmax) - zr)
                            for v, t, i in zip(q, ts.tolist(), inside.tolist())],
                           dtype=torch.float64)
    idx, chan = _layout(ts.numel(), axis)
    scales = torch.tensor([0.125] if axis is None else CHANNEL_SCALES, dtype=torch.float64)
    s_el = scales[chan]
    x = (ts[idx] * s_el).to(device, dtype)
    s_t = scales.float().reshape(()) if axis is None else scales.float()
    z_t = torch.full(s_t.shape, zp)
    grad_factor = 0.5
    y, dx, ds, dz = run_op(x, s_t.to(device), z_t.to(device), torch.ones_like(x), bits, signed,
                           axis, backend, grad_factor)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.cpu().double(), steps[idx] * s_el), "ties must round half to even"
    assert torch.equal(dx.cpu().double(), inside[idx].double()), \
        "dx: the clamp decided on the even integer"
    ds_want = grad_factor * _channel_sum(ds_term[idx], chan, axis)
    dz_want = grad_factor * _channel_sum(torch.where(inside[idx], 0.0, -s_el), chan, axis)
    assert torch.equal(ds.cpu().double(), ds_want), (ds, ds_want)
    assert torch.equal(dz.cpu().double(), dz_want), (dz, dz_want)


LARGE_AND_SPECIAL = [8388607.5, 8388606.5, 8388608.0, 8388609.0, 1e30, -1e30, 0.5, 1.5, 2.5,
                     -0.5, -1.5, -2.5, 4194303.5, -4194302.5, 6291457.5, float("inf"),
                     float("-inf"), float("nan"), -0.0, 1e-40, 0.49999997, -0.49999997,
                     1.4999999, 2.5000002]


def _check_values(y, want):
    y, want = y.float().cpu(), want.float()
    assert torch.equal(y.isnan(), want.isnan())
    ok = want.isnan() | (y == want)
    assert bool(ok.all()), [(float(a), float(b)) for a, b in zip(y[~ok], want[~ok])]


@pytest.mark.parametrize("backend,device", all_backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_rint_large_and_special_values(backend, device, dtype):
    """The backend's forward kernel called with a grid wide enough (+-2^30) that nothing
    small clamps: halves up to 2^23 round to even, |t| >= 2^23 passes unchanged, inf clamps
    to the range's end, nan stays nan; values just off a half (0.49999997, where
    floor(t + 0.5) gives 1) round to nearest. Expected values from Python's round, cast to
    dtype as the kernels return them (float16: 2^30 and 8388608 overflow to inf)."""
    fwd, _ = sk.backends.implementation("fake_quant", backend)
    vals = torch.tensor(LARGE_AND_SPECIAL).to(dtype).float()  # what dtype can hold
    want = torch.tensor([_expected_fq(v, 0.0, -2**30, 2**30) for v in vals.tolist()])
    idx, _ = _layout(vals.numel(), None)
    one, zero = torch.tensor(1.0, device=device), torch.tensor(0.0, device=device)
    y = fwd(vals[idx].to(device, dtype), one, zero, -2**30, 2**30, -1, 0)
    assert y.dtype == dtype and y.shape == idx.shape
    _check_values(y, want.to(dtype)[idx])
    if dtype != torch.float32:
        return
    # Ties of large magnitude per tensor and per channel, with zero points on ties (-3.5 ->
    # -4, 2.5 -> 2), scale 1/4, no clamping: float32 only, bfloat16 cannot hold them.
    ts = torch.arange(-100, 100, dtype=torch.float32) * 4001 + 0.5
    for axis, zp in ((None, -3.5), (PER_CHANNEL_AXIS, 2.5)):
        idx, _ = _layout(ts.numel(), axis)
        shape = () if axis is None else (PER_CHANNEL_SHAPE[axis],)
        s = torch.full(shape, 0.25, device=device)
        z = torch.full(shape, zp, device=device)
        y = fwd((ts[idx] * 0.25).to(device), s, z, -2**22, 2**22,
                -1 if axis is None else axis, 0)
        want = torch.tensor([_expected_fq(t, zp, -2**22, 2**22) * 0.25 for t in ts.tolist()])
        _check_values(y, want[idx])


@pytest.mark.parametrize("backend,device", all_backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [None, PER_CHANNEL_AXIS])
def test_special_values_through_the_op(backend, device, dtype, axis):
    """inf and -inf clamp to the range's ends, nan stays nan, dx is zero for all three (they
    are outside the range: nan compares false), through the public op on a 4-bit grid."""
    vals = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.3, 1e30, -0.0])
    vals = vals.to(dtype).float()  # float16: 1e30 is inf
    sv = [0.5] if axis is None else [0.5, 0.25, 0.5, 0.25, 2.0]
    zv = [2.5] if axis is None else [2.5, 5.0, 0.0, 15.0, -3.0]
    idx, chan = _layout(vals.numel(), axis)
    x = vals[idx].to(device, dtype)
    s = torch.tensor(sv).reshape(() if axis is None else (5,))
    z = torch.tensor(zv).reshape(s.shape)
    y, dx, _, _ = run_op(x, s.to(device), z.to(device), torch.ones_like(x), 4, False, axis,
                         backend)
    want = torch.tensor([[_expected_fq(v / sc, zp, 0, 15) * sc for v in vals.tolist()]
                         for sc, zp in zip(sv, zv)])  # [channel, value]
    _check_values(y, want.to(dtype)[chan, idx])
    def inside(t, zp):
        z = min(max(_rne(zp), 0), 15)
        return t == t and 0 <= _rne(t) + z <= 15  # nan: outside
    dx_want = torch.tensor([[float(inside(v / sc, zp)) for v in vals.tolist()]
                            for sc, zp in zip(sv, zv)])
    assert dx_want[:, :3].eq(0).all() and dx_want.eq(1).any()
    assert torch.equal(dx.cpu().float(), dx_want[chan, idx]), "dx: 1 only inside the range"


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


@pytest.mark.parametrize("backend,device", all_backend_params())
def test_qparam_grads_skipped_when_not_needed(backend, device, monkeypatch):
    """The backend's backward is asked for scale / zero-point gradients only when one of them
    requires grad (qparam_grads); dx is the same either way."""
    impls = sk.backends._OPS["fake_quant"].impls
    fwd, bwd = impls[backend]
    asked = []

    def spy(*args):
        asked.append(args[8])  # (dy, x, scale, zero_point, qmin, qmax, axis, gf, qparam_grads, act)
        return bwd(*args)
    monkeypatch.setitem(impls, backend, (fwd, spy))
    x0 = torch.randn(4097, device=device)  # a tensor size whose kernels other tests compile
    dxs = []
    for s_grad, z_grad in [(False, False), (True, False), (False, True), (True, True)]:
        x = x0.clone().requires_grad_()
        s = torch.tensor(0.1, device=device, requires_grad=s_grad)
        z = torch.tensor(3.0, device=device, requires_grad=z_grad)
        sk.fake_quant(x, s, z, 4, backend=backend).sum().backward()
        assert (s.grad is not None) == s_grad and (z.grad is not None) == z_grad
        dxs.append(x.grad)
    assert asked == [False, True, True, True]
    inside = ((torch.round(x0 / 0.1) + 3 >= 0) & (torch.round(x0 / 0.1) + 3 <= 15)).float()
    assert 0 < int(inside.sum()) < 4097
    for dx in dxs:
        assert torch.equal(dx, inside)


def test_matches_torch_for_scalar_qparams():
    x = torch.randn(50)
    y = sk.fake_quant(x, 0.125, 2, 4)
    want = torch.fake_quantize_per_tensor_affine(x, 0.125, 2, 0, 15)
    assert torch.equal(y, want)

"""fake_quant with a fused activation (activation="relu" / "relu6"): the same bits as
torch.relu / F.relu6 followed by fake_quant, forward and backward (dx, d scale, d zero_point),
on every backend that runs here (the cuda one and Triton on a GPU, Triton under its
interpreter on a CPU)."""
import pytest
import torch
import torch.nn.functional as F

import synq_kernels as sk

from fake_quant_cases import assert_grads_close, make_inputs, qparam_grad_tolerance

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = sk.available_backends("fake_quant", DEVICE)
ACTS = {"relu": torch.relu, "relu6": F.relu6}

# (shape, axis, channels_last): per-tensor, per-channel along a middle dim (NCHW segments),
# along the last dim (rows), and a channels-last activation (the fine-tuning case)
CASES = [((3, 5, 7, 9), None, False), ((2, 33, 5, 3), 1, False), ((37, 129), -1, False),
         ((4, 16, 6, 5), None, True), ((3, 20, 5, 7), 1, True), ((1031,), None, False)]


def _inputs(shape, axis, dtype, channels_last, seed):
    x, s, z, dy, qmin, qmax = make_inputs(shape, axis, torch.float32, 4, False, DEVICE, seed)
    x = x * 2  # reach past 6 for ReLU6
    flat = x.view(-1)
    # the activations' edges: exact zeros of both signs, 6 and values around it
    flat[:8] = torch.tensor([0.0, -0.0, 6.0, -6.0, 5.999, 6.001, 1e-30, -1e-30])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    return x.to(dtype), s, z, dy.to(dtype), qmin, qmax


def _run(x, s, z, dy, axis, activation, backend, fused, grad_factor=0.5):
    xi = x.clone().requires_grad_()
    si, zi = s.clone().requires_grad_(), z.clone().requires_grad_()
    if fused:
        y = sk.fake_quant(xi, si, zi, 4, axis=axis, grad_factor=grad_factor,
                          activation=activation, backend=backend)
    else:
        y = sk.fake_quant(ACTS[activation](xi), si, zi, 4, axis=axis, grad_factor=grad_factor,
                          backend=backend)
    y.backward(dy)
    return y.detach(), xi.grad, si.grad, zi.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "relu6"])
@pytest.mark.parametrize("shape, axis, channels_last", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_activation_then_fake_quant(backend, activation, shape, axis,
                                                 channels_last, dtype):
    x, s, z, dy, _, _ = _inputs(shape, axis, dtype, channels_last, seed=len(shape) + 7)
    fused = _run(x, s, z, dy, axis, activation, backend, True)
    apart = _run(x, s, z, dy, axis, activation, backend, False)
    for name, a, b in zip(("y", "dx", "d scale", "d zero_point"), fused, apart):
        assert torch.equal(a, b), f"{name} differs ({backend}, {activation})"
        if name in ("y", "dx"):  # -0 against +0 too
            assert torch.equal(torch.signbit(a), torch.signbit(b)), name
    assert fused[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    # the masks did something: some dx are zeroed by the activation alone
    fq_only = _run(x, s, z, dy, axis, None, backend, True)[1]
    assert not torch.equal(fused[1], fq_only)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_fused_matches_reference_backend(backend, activation):
    x, s, z, dy, _, _ = _inputs((5, 24, 9, 11), 1, torch.float32, True, seed=3)
    got = _run(x, s, z, dy, 1, activation, backend, True)
    want = _run(x, s, z, dy, 1, activation, "reference", True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # the gradient sums differ in order only (fake_quant_cases' bound, on the activated x)
    tol_s, tol_z = qparam_grad_tolerance(dy, ACTS[activation](x), s, z, 0, 15, 1, 0.5)
    assert_grads_close(got[2], want[2], tol_s, "d scale")
    assert_grads_close(got[3], want[3], tol_z, "d zero_point")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_no_qparam_grads(backend):
    x = torch.tensor([float("nan"), -1.0, 0.5, 7.0, float("inf"), -float("inf")], device=DEVICE)
    s, z = torch.tensor(0.1, device=DEVICE), torch.tensor(0.0, device=DEVICE)
    for activation in ("relu", "relu6"):
        xi = x.clone().requires_grad_()
        y = sk.fake_quant(xi, s, z, 4, activation=activation, backend=backend)
        y.backward(torch.ones_like(y))
        xr = x.clone().requires_grad_()
        yr = sk.fake_quant(ACTS[activation](xr), s, z, 4, backend=backend)
        yr.backward(torch.ones_like(yr))
        assert torch.equal(y.isnan(), yr.isnan())
        assert torch.equal(y.nan_to_num(), yr.nan_to_num()) and torch.equal(xi.grad, xr.grad)


@pytest.mark.parametrize("activation", ["gelu", "ReLU", 1, True, ""])
def test_bad_activation(activation):
    with pytest.raises(ValueError, match="activation must be one of None, 'relu', 'relu6'"):
        sk.fake_quant(torch.randn(4), 0.1, 0.0, 4, activation=activation)


def test_compiled_op_rejects_bad_act():
    if "cpu" not in sk.available_backends("fake_quant", "cpu"):
        pytest.skip("no compiled cpu backend")
    x = torch.randn(4)
    with pytest.raises(RuntimeError, match="act must be 0"):
        torch.ops.synq._fake_quant_fwd(x, torch.tensor(0.1), torch.tensor(0.), 0, 15, -1, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(9,), (3, 9, 2, 2)])
def test_edges_inside_the_grid(backend, shape):
    """Scale 0.5 on 4 bits spans [0, 7.5]: the activations' edges (0, -0, 6, beyond 6) lie
    inside the fake quantization's range, so only the activation's mask can zero dx there."""
    vals = torch.tensor([-1.0, -0.0, 0.0, 1e-30, 3.0, 6.0, 6.5, 7.0, 100.0], device=DEVICE)
    want = {"relu": [0, 0, 0, 1, 1, 1, 1, 1, 0], "relu6": [0, 0, 0, 1, 1, 0, 0, 0, 0]}
    view = (1, 9, 1, 1) if len(shape) == 4 else (9,)  # the values along dim 1 of a 4-D x
    x = vals.reshape(view).expand(shape).contiguous()
    s, z = torch.tensor(0.5, device=DEVICE), torch.tensor(0.0, device=DEVICE)
    for activation, mask in want.items():
        fused = _run(x, s, z, torch.ones_like(x), None, activation, backend, True)
        apart = _run(x, s, z, torch.ones_like(x), None, activation, backend, False)
        for a, b in zip(fused, apart):
            assert torch.equal(a, b)
        m = torch.tensor(mask, dtype=torch.float32, device=DEVICE).reshape(view).expand(shape)
        assert torch.equal(fused[1], m), (activation, fused[1])

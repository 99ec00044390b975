"""lowpass: every backend against the torch.fft reference (sizes, cut-offs, batch shapes,
strides, dtypes, both masks), gradients against autograd through the reference, opcheck,
torch.compile, argument errors and empty batches."""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton on CPU tensors: the interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import synq_kernels as sk  # noqa: E402
from synq_kernels import reference as R  # noqa: E402

GPU = torch.cuda.is_available()
CPU_BACKENDS = [b for b in ("cpu", "triton") if b in sk.available_backends("lowpass", "cpu")]
GPU_BACKENDS = [b for b in ("cuda", "triton")
                if GPU and b in sk.available_backends("lowpass", "cuda")]
INTERPRETED = not GPU  # Triton on CPU tensors runs in the (slow) interpreter
SIZES = [(1, 1), (7, 5), (28, 28), (31, 33), (32, 32), (224, 224)]
D0S = [0.5, 3.0, 20.0, 80.0, 200.0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_params():
    params = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in CPU_BACKENDS]
    params += [pytest.param(b, "cuda", id=f"{b}-cuda") for b in GPU_BACKENDS]
    if not GPU:
        params.append(pytest.param("cuda", "cuda", id="cuda-cuda",
                                   marks=pytest.mark.skip(reason="no CUDA GPU")))
    return params


BACKENDS = backend_params()


def slow(backend, device):
    return backend == "triton" and device == "cpu"


def compute_tol(backend, device):
    """Error of the float32 computation, relative to max|x|: float32 rounding over a few
    hundred products on CPUs and in the interpreter; TF32 tensor-core products (10-bit
    mantissa, float32 accumulation) on GPUs."""
    return 4e-3 if device == "cuda" and backend != "reference" else 2e-6


def assert_matches_reference(y, x, d0, mask, backend, device):
    want = R.lowpass_forward(x, d0, mask)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    scale = x.float().abs().max().clamp_min(1e-30)
    # Both y and the reference are rounded to x's dtype: one unit in the last place of the
    # output apart, plus the computation's own error.
    eps = torch.finfo(x.dtype).eps if x.dtype != torch.float32 else 0.0
    atol = compute_tol(backend, device) * scale + eps * want.float().abs().max()
    err = (y.float() - want.float()).abs().max()
    assert err <= atol, f"max error {float(err):.3g} > {float(atol):.3g} ({backend}, d0={d0})"


def cases(backend, device):
    """(shape, d0) pairs: the full grid, or a subset that the interpreter runs in seconds."""
    wide = [((2, 9, 300), 40.0), ((1, 257, 3), 40.0)]  # past 256 a side: the FFT route
    if not slow(backend, device):
        return [((2, 3, h, w), d0) for h, w in SIZES for d0 in D0S] + wide
    out = [((2, h, w), d0) for h, w in SIZES[:-1] for d0 in (0.5, 20.0, 200.0)]
    return out + [((1, 224, 224), 80.0)] + wide


# -- the reference itself ---------------------------------------------------------------------

@pytest.mark.parametrize("h,w", SIZES + [(2, 9), (16, 1)])
@pytest.mark.parametrize("d0", [0.5, 7.0, 80.0])
def test_separable_form_equals_fft_reference(h, w, d0):
    x = torch.randn(2, h, w)
    torch.testing.assert_close(R.lowpass_gaussian_separable(x, d0), R.lowpass_forward(x, d0),
                               rtol=0, atol=2e-6 * float(x.abs().max()))


def test_reference_mask_values():
    m = R.lowpass_mask(5, 4, 1.5, "gaussian", dtype=torch.float64)
    i, j = 3, 1  # distance^2 = (3 - 2)^2 + (1 - 2)^2 = 2
    assert abs(float(m[i, j]) - math.exp(-2 / (2 * 1.5 ** 2))) < 1e-12
    ideal = R.lowpass_mask(5, 4, 1.0, "ideal")
    assert ideal.sum() == 5 and ideal[2, 2] == 1 and ideal[1, 1] == 0


def test_large_d0_is_identity_and_tiny_d0_is_mean():
    x = torch.randn(3, 8, 6)
    torch.testing.assert_close(sk.lowpass(x, 1e4, backend="reference"), x, atol=1e-5, rtol=0)
    mean = x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    torch.testing.assert_close(sk.lowpass(x, 1e-3, "ideal"), mean, atol=1e-5, rtol=0)


# -- every backend against the reference ------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gaussian_matches_reference_fp32(backend, device):
    for shape, d0 in cases(backend, device):
        x = torch.randn(shape, device=device)
        assert_matches_reference(sk.lowpass(x, d0, backend=backend), x, d0, "gaussian",
                                 backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_half_precision(backend, device, dtype):
    shapes = [(2, 31, 33)] if slow(backend, device) else [(2, 3, 31, 33), (2, 3, 224, 224)]
    for shape in shapes:
        x = (torch.randn(shape, device=device) * 3).to(dtype)
        assert_matches_reference(sk.lowpass(x, 20.0, backend=backend), x, 20.0, "gaussian",
                                 backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ideal_mask(backend, device):
    for shape, d0 in [((2, 31, 33), 7.0), ((2, 3, 28, 28), 10.0), ((1, 1, 1), 0.5)]:
        x = torch.randn(shape, device=device)
        assert_matches_reference(sk.lowpass(x, d0, "ideal", backend=backend), x, d0, "ideal",
                                 backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_plain_image_and_non_contiguous(backend, device):
    x2 = torch.randn(31, 33, device=device)  # (H, W), no batch dims
    assert_matches_reference(sk.lowpass(x2, 5.0, backend=backend), x2, 5.0, "gaussian",
                             backend, device)
    base = torch.randn(4, 3, 40, 62, device=device)
    for x in (base.transpose(-1, -2)[::2],           # (2, 3, 62, 40), transposed
              base[:, 1:, 3:31, ::2],                # (4, 2, 28, 31), strided
              base.to(memory_format=torch.channels_last)):
        assert not x.is_contiguous()
        assert_matches_reference(sk.lowpass(x, 12.0, backend=backend), x, 12.0, "gaussian",
                                 backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mask", ["gaussian", "ideal"])
def test_gradients_match_autograd_through_reference(backend, device, mask):
    shape = (2, 31, 33) if slow(backend, device) else (2, 3, 31, 33)
    x = torch.randn(shape, device=device)
    dy = torch.randn(shape, device=device)
    xa = x.clone().requires_grad_()
    sk.lowpass(xa, 6.0, mask, backend=backend).backward(dy)
    xr = x.clone().requires_grad_()
    R.lowpass_forward(xr, 6.0, mask).backward(dy)  # torch.fft's own autograd
    atol = compute_tol(backend, device) * float(dy.abs().max())
    torch.testing.assert_close(xa.grad, xr.grad, rtol=0, atol=atol)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    y = sk.lowpass(x, 3.0, backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


# -- registration, compile, backend choice, errors --------------------------------------------

@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("mask", ["gaussian", "ideal"])
def test_opcheck(backend, mask):
    x = torch.randn(2, 7, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.synq.lowpass.default, (x, 2.5, mask, backend))


def test_torch_compile_fullgraph():
    def step(x):
        return (sk.lowpass(x * 2, 20.0) ** 2).sum()

    # aot_eager traces what inductor would (fake kernel, autograd, no graph break) without
    # its C++ code generation, which costs ~20 s here; fake_quant's test runs inductor.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 28, 28, requires_grad=True)
    out = compiled(x)
    out.backward()
    grad = x.grad.clone()
    x.grad = None
    want = step(x)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(grad, x.grad)


def test_default_backend():
    expected = "cpu" if "cpu" in CPU_BACKENDS else "reference"
    assert sk.available_backends("lowpass", "cpu")[0] == expected


@pytest.mark.parametrize("d0", [0.0, -1.0, float("nan"), float("inf"), "80", None, True])
def test_bad_d0(d0):
    with pytest.raises(ValueError, match="d0"):
        sk.lowpass(torch.randn(4, 4), d0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="mask must be one of.*'box'"):
        sk.lowpass(torch.randn(4, 4), 3.0, mask="box")
    with pytest.raises(ValueError, match=r"at least 2 dims.*\(5,\)"):
        sk.lowpass(torch.randn(5), 3.0)
    with pytest.raises(TypeError, match="x must be a floating tensor.*int64"):
        sk.lowpass(torch.ones(4, 4, dtype=torch.int64), 3.0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sk.lowpass([[1.0, 2.0]], 3.0)
    with pytest.raises(ValueError, match="not a backend"):
        sk.lowpass(torch.randn(4, 4), 3.0, backend="fft")
    with pytest.raises(RuntimeError, match="cuda"):
        sk.lowpass(torch.randn(4, 4), 3.0, backend="cuda")


_AOT_SCRIPT = r'''
import synq_kernels.triton.lowpass as m

# the GPU launch configurations of lowpass_gaussian: 28x28 (bundled model), 32x32, 224x224
for dt, (bm, bw, bk, bn) in [("fp32", (32, 32, 32, 32)), ("bf16", (32, 32, 32, 32)),
                             ("fp16", (64, 256, 32, 32)), ("fp32", (64, 256, 32, 32))]:
    ptx = build(m._lowpass_gaussian_kernel, {
        "x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "ah_ptr": "*fp32", "aw_ptr": "*fp32",
        "H": "i32", "W": "i32", "n_mblocks": "i32"},
        {"BM": bm, "BW": bw, "BK": bk, "BN": bn, "PRECISION": m.GPU_PRECISION, "INT64": False,
         "ROUND_BF16": dt == "bf16"}, ["ah_ptr", "aw_ptr"],
        num_warps=8 if bm * bw >= 8192 else 4, num_stages=2)
    mma = re.findall(r"(?:wgmma\.mma_async|mma\.sync)\S*", ptx)
    assert mma and all("tf32" in x for x in mma), (dt, bw, sorted(set(mma))[:3])
print("ok")
'''


def test_triton_compiles_to_tf32_mma_for_sm90_without_gpu():
    pytest.importorskip("triton")
    import triton_aot
    triton_aot.run(_AOT_SCRIPT)

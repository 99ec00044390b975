"""synq_kernels.channel_stats: per-channel mean / biased variance over (B, H, W) and their
gradient, every backend against float64 on awkward shapes, strides and dtypes; opcheck;
torch.compile; errors; bns_loss through it."""
import pytest
import torch

import synq_kernels as sk

BACKENDS = sk.available_backends("channel_stats", "cpu")
SHAPES = [(1, 1, 1, 1), (2, 3, 1, 1), (3, 5, 7, 11), (1, 4, 33, 65), (17, 2, 5, 3),
          (4, 3, 1, 37), (2, 1, 130, 9)]


def _f64(x):
    v, m = torch.var_mean(x.detach().double(), dim=(0, 2, 3), unbiased=False)
    return m, v


def test_cpu_backend_is_built():
    assert "reference" in BACKENDS
    if sk._ext.has_cpu_kernels():
        assert BACKENDS[0] == "cpu"
    if sk.backends._triton_reason("cpu") is None:  # the interpreter: Triton tested here too
        assert "triton" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_statistics_match_float64(backend, shape):
    g = torch.Generator().manual_seed(sum(shape))
    # a large common offset: a one-pass E[x^2] - E[x]^2 would lose the variance here
    x = torch.randn(shape, generator=g) * 0.5 + 300.0
    m, v = sk.channel_stats(x, backend=backend)
    m64, v64 = _f64(x)
    assert m.dtype == v.dtype == torch.float32 and m.shape == v.shape == (shape[1],)
    torch.testing.assert_close(m.double(), m64, rtol=1e-6, atol=0)
    torch.testing.assert_close(v.double(), v64, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("which", ["both", "mean", "var"])
def test_gradient_matches_float64_autograd(backend, shape, which):
    g = torch.Generator().manual_seed(7 + sum(shape))
    x = (torch.randn(shape, generator=g) * 2 - 1).requires_grad_(True)
    gm = torch.randn(shape[1], generator=g, dtype=torch.float64)
    gv = torch.randn(shape[1], generator=g, dtype=torch.float64)

    def loss(m, v):
        terms = {"both": (m * gm).sum() + (v * gv).sum(), "mean": (m * gm).sum(),
                 "var": (v * gv).sum()}
        return terms[which]
    m, v = sk.channel_stats(x, backend=backend)
    (dx,) = torch.autograd.grad(loss(m.double(), v.double()), x)
    x64 = x.detach().double().requires_grad_(True)
    v64, m64 = torch.var_mean(x64, dim=(0, 2, 3), unbiased=False)
    (dx64,) = torch.autograd.grad(loss(m64, v64), x64)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-6 * dx64.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_strides_and_half_precision(backend):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, 9, 7, generator=g)
    m64, v64 = _f64(base)
    for x in (base.contiguous(memory_format=torch.channels_last),
              base.transpose(0, 1).contiguous().transpose(0, 1),        # permuted strides
              torch.randn(6, 5, 9, 14, generator=g)[..., ::2]):         # a gap in W
        m, v = sk.channel_stats(x, backend=backend)
        ref_m, ref_v = _f64(x)
        torch.testing.assert_close(m.double(), ref_m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.double(), ref_v, rtol=1e-5, atol=1e-6)
    gm, gv = torch.randn(5, generator=g), torch.randn(5, generator=g)
    for dt in (torch.float16, torch.bfloat16):
        x = base.to(dt).requires_grad_(True)
        m, v = sk.channel_stats(x, backend=backend)
        ref_m, ref_v = _f64(x)  # of the rounded input: computed in float32 from it
        torch.testing.assert_close(m.double(), ref_m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.double(), ref_v, rtol=1e-5, atol=1e-6)
        (dx,) = torch.autograd.grad((m * gm).sum() + (v * gv).sum(), x)
        assert dx.dtype == dt and dx.shape == x.shape
        # float64 autograd on the rounded input: dx is computed in float32 and rounded once
        # to dt (half an ulp), so 2 eps(dt) of its largest element bounds the error
        x64 = x.detach().double().requires_grad_(True)
        v64, m64 = torch.var_mean(x64, dim=(0, 2, 3), unbiased=False)
        (dx64,) = torch.autograd.grad((m64 * gm.double()).sum() + (v64 * gv.double()).sum(), x64)
        torch.testing.assert_close(dx.double(), dx64, rtol=0,
                                   atol=2 * torch.finfo(dt).eps * dx64.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (2, 40, 6, 5), (3, 17, 1, 1), (1, 33, 20, 20)])
def test_channels_last_statistics_and_gradient(backend, shape):
    """Channels-last input (a model in channels-last memory format): read as it is, dx
    returned channels-last; channel counts around the kernel's 16-channel slices."""
    g = torch.Generator().manual_seed(5 + sum(shape))
    x = (torch.randn(shape, generator=g) * 0.7 + 50.0).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    m, v = sk.channel_stats(x, backend=backend)
    m64, v64 = _f64(x)
    torch.testing.assert_close(m.double(), m64, rtol=1e-6, atol=0)
    torch.testing.assert_close(v.double(), v64, rtol=2e-4, atol=1e-7)
    gm = torch.randn(shape[1], generator=g)
    gv = torch.randn(shape[1], generator=g)
    (dx,) = torch.autograd.grad((m * gm).sum() + (v * gv).sum(), x)
    x64 = x.detach().double().requires_grad_(True)
    v64, m64 = torch.var_mean(x64, dim=(0, 2, 3), unbiased=False)
    (dx64,) = torch.autograd.grad((m64 * gm.double()).sum() + (v64 * gv.double()).sum(), x64)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    # the float32 mean of values near 50 is off by up to 2e-6, which shifts every dx of a
    # channel by a[c] times that: about 1e-6 of max|dx| (the float64 reference has no error)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-5 * dx64.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    m, v = sk.channel_stats(torch.zeros(0, 3, 4, 4), backend=backend)
    assert m.shape == (3,) and torch.isnan(m).all() and torch.isnan(v).all()
    m, v = sk.channel_stats(torch.zeros(2, 0, 4, 4), backend=backend)
    assert m.shape == v.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = torch.randn(3, 4, 5, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.synq.channel_stats.default, (x, backend))
    mean = x.detach().mean((0, 2, 3))
    for xd in (x.detach(), x.detach().contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(torch.ops.synq.channel_stats_backward.default,
                              (torch.randn(4), torch.randn(4), xd, mean, backend))
    xcl = torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.synq.channel_stats.default, (xcl, backend))


def test_torch_compile_fullgraph():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)

    def f(x):
        m, v = sk.channel_stats(x)
        return (m.square() + v).sum()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))
    (g1,) = torch.autograd.grad(compiled(x), x)
    (g2,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("x, err, match", [
    (torch.randn(3, 4, 5), ValueError, r"\(B, C, H, W\)"),
    (torch.ones(2, 3, 4, 4, dtype=torch.int32), TypeError, "floating"),
    ([1.0], TypeError, "torch.Tensor"),
])
def test_bad_input(x, err, match):
    with pytest.raises(err, match=match):
        sk.channel_stats(x)


def test_bad_backend():
    with pytest.raises(ValueError, match="not a backend"):
        sk.channel_stats(torch.randn(1, 1, 2, 2), backend="gpu")
    with pytest.raises(NotImplementedError, match="no 'cuda' backend"):
        sk.channel_stats(torch.randn(1, 1, 2, 2), backend="cuda")


def test_gpu_default_is_the_reference():
    # timed on an H100 and an H200 (benchmarks/results/gpu_2026-11-27/): var_mean won every row
    info = sk.backends._OPS["channel_stats"]
    assert info.preference["cuda"][0] == "reference"
    assert "triton" in info.impls or sk.backends._triton_reason("cuda") is not None


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("shape", SHAPES + [(64, 8, 112, 112)])
def test_triton_cuda_matches_float64(shape):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=g) + 3.0).cuda().requires_grad_(True)
    m, v = sk.channel_stats(x, backend="triton")
    m64, v64 = _f64(x.cpu())
    torch.testing.assert_close(m.double().cpu(), m64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.double().cpu(), v64, rtol=1e-4, atol=1e-6)
    gm, gv = torch.randn_like(m), torch.randn_like(v)
    (dx,) = torch.autograd.grad((m * gm).sum() + (v * gv).sum(), x)
    (dref,) = torch.autograd.grad(sum((t * gt).sum() for t, gt in zip(
        sk.channel_stats(x, backend="reference"), (gm, gv))), x)
    torch.testing.assert_close(dx, dref, rtol=1e-4, atol=1e-6 * dref.abs().max().item())


_AOT_SCRIPT = r'''
import synq_kernels.triton.channel_stats as m

for dt in ("fp32", "bf16", "fp16"):
    for blk in (16, 1024):
        ptx = build(m._row_stats_kernel, {"x_ptr": f"*{dt}", "mean_ptr": "*fp32",
                    "m2_ptr": "*fp32", "HW": "i32"}, {"BLOCK": blk}, ["x_ptr", "HW"])
        assert "ld.global" in ptx and "st.global" in ptx, (dt, blk)
        ptx = build(m._backward_kernel, {"x_ptr": f"*{dt}", "dx_ptr": "*fp32", "a_ptr": "*fp32",
                    "b_ptr": "*fp32", "mean_ptr": "*fp32", "C": "i32", "HW": "i32"},
                    {"BLOCK": blk}, ["x_ptr", "dx_ptr", "HW"])
        assert "ld.global.v4" in ptx or blk == 16, (dt, blk)  # vectorized on aligned rows
print("ok")
'''


def test_triton_compiles_for_sm90_without_gpu():
    pytest.importorskip("triton")
    import triton_aot
    triton_aot.run(_AOT_SCRIPT)

"""synq_kernels.batch_norm_stats (eval-mode BatchNorm fused with its input's channel
statistics): every backend against float64 on awkward shapes and layouts; the cpu backend
bit for bit against the separate ops it replaces (F.batch_norm and channel_stats, forward and
backward); opcheck, torch.compile, errors; BNStats and synthesis with and without it."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import synq_kernels as sk
from synq import losses, synth

BACKENDS = sk.available_backends("batch_norm_stats", "cpu")
# (B, C, H, W), channels-last: C of 1 (NCHW rows of one channel), a 64-channel slice plus a
# tail, one pixel, many pixels per image (several 256-pixel chunks)
CASES = [((1, 1, 1, 1), False), ((3, 5, 7, 11), False), ((2, 70, 3, 5), True),
         ((4, 3, 1, 37), True), ((5, 130, 2, 3), True), ((2, 16, 28, 28), True),
         ((1, 33, 17, 19), False), ((3, 1, 9, 9), True)]


def _params(c, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c, generator=g) * 0.3, torch.rand(c, generator=g) + 0.2,
            torch.randn(c, generator=g), torch.randn(c, generator=g))


def _input(shape, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0 + 0.5
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _float64(x, rm, rv, w, b, eps, gy, gm, gv, act=None):
    """y, mean, var and dx of <gy, y> + <gm, mean> + <gv, var> in float64 autograd."""
    x64 = x.detach().double().requires_grad_(True)
    v = (1, -1, 1, 1)
    y = (x64 - rm.double().view(v)) / torch.sqrt(rv.double().view(v) + eps) * w.double().view(v) \
        + b.double().view(v)
    if act == "relu":
        y = torch.relu(y)
    elif act == "relu6":
        y = F.relu6(y)
    var, mean = torch.var_mean(x64, dim=(0, 2, 3), unbiased=False)
    loss = (y * gy.double()).sum() + (mean * gm.double()).sum() + (var * gv.double()).sum()
    (dx,) = torch.autograd.grad(loss, x64)
    return y.detach(), mean.detach(), var.detach(), dx


def test_cpu_backend_is_built():
    assert "reference" in BACKENDS
    if sk._ext.has_cpu_kernels():
        assert BACKENDS[0] == "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, cl", CASES)
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_matches_float64(backend, shape, cl, act):
    c = shape[1]
    rm, rv, w, b = _params(c, sum(shape))
    x = _input(shape, cl, 1 + sum(shape)).requires_grad_(True)
    g = torch.Generator().manual_seed(2 + sum(shape))
    gy, gm, gv = torch.randn(shape, generator=g), torch.randn(c, generator=g), \
        torch.randn(c, generator=g)
    y, mean, var = sk.batch_norm_stats(x, rm, rv, w, b, eps=1e-3, activation=act,
                                       backend=backend)
    (dx,) = torch.autograd.grad((y * gy).sum() + (mean * gm).sum() + (var * gv).sum(), x)
    y64, m64, v64, dx64 = _float64(x, rm, rv, w, b, 1e-3, gy, gm, gv, act)
    assert y.dtype == dx.dtype == torch.float32 and mean.dtype == var.dtype == torch.float32
    if cl and c > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert dx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), v64, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-5 * dx64.abs().max().item())


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled cpu kernels")
@pytest.mark.parametrize("shape, cl", CASES)
@pytest.mark.parametrize("affine, act", [(True, None), (False, None), (True, "relu"),
                                         (True, "relu6")])
def test_cpu_is_bit_identical_to_the_separate_ops(shape, cl, affine, act):
    """The claim synthesis relies on: fusing changes no bit of y, the statistics or dx."""
    c = shape[1]
    rm, rv, w, b = _params(c, 3 * sum(shape))
    if not affine:
        w = b = None
    x = _input(shape, cl, 5 + sum(shape))
    g = torch.Generator().manual_seed(4 + sum(shape))
    gy, gm, gv = torch.randn(shape, generator=g), torch.randn(c, generator=g), \
        torch.randn(c, generator=g)

    xa = x.clone().requires_grad_(True)
    y, mean, var = sk.batch_norm_stats(xa, rm, rv, w, b, activation=act, backend="cpu")
    (dx,) = torch.autograd.grad((y * gy).sum() + (mean * gm).sum() + (var * gv).sum(), xa)

    xb = x.clone().requires_grad_(True)
    y0 = F.batch_norm(xb, rm, rv, w, b, False, 0.1, 1e-5)
    if act is not None:
        y0 = {"relu": nn.ReLU(), "relu6": nn.ReLU6()}[act](y0)
    mean0, var0 = sk.channel_stats(xb, backend="cpu")
    (dx0,) = torch.autograd.grad((y0 * gy).sum() + (mean0 * gm).sum() + (var0 * gv).sum(), xb)
    assert torch.equal(y, y0)
    assert torch.equal(mean, mean0) and torch.equal(var, var0)
    assert torch.equal(dx, dx0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_strides(backend, dtype):
    rm, rv, w, b = _params(6, 0)
    base = torch.randn(3, 12, 5, 8)
    x = base[:, ::2, :, 1:7].to(dtype).requires_grad_(True)  # not contiguous in any format
    y, mean, var = sk.batch_norm_stats(x, rm, rv, w, b, backend=backend)
    ref_y = F.batch_norm(x.detach().float(), rm, rv, w, b, False, 0.0, 1e-5)
    assert y.dtype == dtype and mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref_y, rtol=1e-2, atol=1e-2)
    m0, v0 = sk.channel_stats(x.detach().float(), backend="reference")
    torch.testing.assert_close(mean, m0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, v0, rtol=1e-4, atol=1e-6)
    g = torch.Generator().manual_seed(9)
    gy, gm, gv = torch.randn(x.shape, generator=g), torch.randn(6, generator=g), \
        torch.randn(6, generator=g)
    gy = gy.to(dtype).float()  # what reaches y (a dtype tensor) through .float()
    (dx,) = torch.autograd.grad((y.float() * gy).sum() + (mean * gm).sum() + (var * gv).sum(),
                                x)
    assert dx.dtype == dtype and dx.shape == x.shape
    # float64 autograd on the rounded input: dx is computed in float32 and rounded once to
    # dtype (half an ulp), so 2 eps(dtype) of its largest element bounds the error
    _, _, _, dx64 = _float64(x, rm, rv, w, b, 1e-5, gy, gm, gv)
    torch.testing.assert_close(dx.double(), dx64, rtol=0,
                               atol=2 * torch.finfo(dtype).eps * dx64.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_some_outputs_used_and_no_grad(backend):
    rm, rv, w, b = _params(4, 1)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    y, mean, var = sk.batch_norm_stats(x, rm, rv, w, b, backend=backend)
    (dx,) = torch.autograd.grad(var.sum(), x)  # y and mean unused: zero gradients for them
    (dx_ref,) = torch.autograd.grad(sk.channel_stats(x, backend="reference")[1].sum(), x)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        y2, _, _ = sk.batch_norm_stats(x, rm, rv, w, b, backend=backend)
    assert not y2.requires_grad and torch.equal(y2, y.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_keeps_torch_semantics_at_zero_and_nan(backend):
    """torch.relu keeps -0 and NaN and its backward passes the gradient where the output is
    NaN; the fused op must give the same bits. BN with weight 1, bias 0, mean 0, var 1 - eps
    (invstd exactly 1) and bias -0 (so that -0 stays -0) passes x through."""
    eps = 2.0 ** -10
    rm, rv, w, b = torch.zeros(2), torch.full((2,), 1 - eps), torch.ones(2), torch.full((2,), -0.0)
    vals = torch.tensor([-0.0, 0.0, float("nan"), -1.5, 2.0, -3.0, 0.5, float("inf")])
    x = vals.repeat(2 * 2 * 3).reshape(2, 2, 3, 8).requires_grad_(True)
    y, _, _ = sk.batch_norm_stats(x, rm, rv, w, b, eps=eps, activation="relu", backend=backend)
    ref = torch.relu(x.detach())
    assert torch.signbit(ref).any()  # the -0 case is there
    assert torch.equal(torch.signbit(y), torch.signbit(ref))
    assert torch.equal(y.nan_to_num(7.0), ref.nan_to_num(7.0))
    # the gradient, on finite values (NaN in x makes the statistics, and so all of dx, NaN)
    x = vals[[0, 1, 3, 4, 5, 6]].repeat(2 * 2 * 3).reshape(2, 2, 3, 6).requires_grad_(True)
    y, mean, var = sk.batch_norm_stats(x, rm, rv, w, b, eps=eps, activation="relu",
                                       backend=backend)
    (dx,) = torch.autograd.grad(y, x, torch.full_like(x, 3.0))
    (dx_ref,) = torch.autograd.grad(torch.relu(x), x, torch.full_like(x, 3.0))
    assert torch.equal(dx, dx_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu6_keeps_torch_semantics_at_the_edges(backend):
    """F.relu6 keeps -0 and NaN, clamps at 0 and 6, and its backward passes the gradient only
    strictly inside (0, 6), NaN not included; same BN pass-through as the ReLU test."""
    eps = 2.0 ** -10
    rm, rv, w, b = torch.zeros(2), torch.full((2,), 1 - eps), torch.ones(2), torch.full((2,), -0.0)
    vals = torch.tensor([-0.0, 0.0, float("nan"), -1.5, 2.0, 6.0, 7.0, float("inf"),
                         -float("inf"), 5.999])
    x = vals.repeat(2 * 2 * 3).reshape(2, 2, 3, 10).requires_grad_(True)
    y, _, _ = sk.batch_norm_stats(x, rm, rv, w, b, eps=eps, activation="relu6", backend=backend)
    ref = F.relu6(x.detach())
    assert torch.equal(torch.signbit(y), torch.signbit(ref)) and torch.signbit(ref).any()
    assert torch.equal(y.nan_to_num(7.0), ref.nan_to_num(7.0))
    x = vals[[0, 1, 3, 4, 5, 6, 9]].repeat(2 * 2 * 3).reshape(2, 2, 3, 7).requires_grad_(True)
    y, _, _ = sk.batch_norm_stats(x, rm, rv, w, b, eps=eps, activation="relu6", backend=backend)
    (dx,) = torch.autograd.grad(y, x, torch.full_like(x, 3.0))
    (dx_ref,) = torch.autograd.grad(F.relu6(x), x, torch.full_like(x, 3.0))
    assert torch.equal(dx, dx_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    rm, rv, w, b = _params(3, 2)
    y, mean, var = sk.batch_norm_stats(torch.zeros(0, 3, 4, 4), rm, rv, w, b, backend=backend)
    assert y.shape == (0, 3, 4, 4) and torch.isnan(mean).all() and torch.isnan(var).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    rm, rv, w, b = _params(4, 3)
    for x in (torch.randn(3, 4, 5, 6),
              torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last)):
        for act in (0, 1, 2):
            torch.library.opcheck(torch.ops.synq.batch_norm_stats.default,
                                  (x.requires_grad_(True), w, b, rm, rv, 1e-5, act, backend))
            mean = x.detach().mean((0, 2, 3))
            torch.library.opcheck(torch.ops.synq.batch_norm_stats_backward.default,
                                  (torch.randn(3, 4, 5, 6), torch.randn(4), torch.randn(4),
                                   x.detach(), torch.randn(3, 4, 5, 6), mean, w, rv, 1e-5, act,
                                   backend))


def test_torch_compile_fullgraph():
    rm, rv, w, b = _params(3, 4)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)

    def f(x):
        y, m, v = sk.batch_norm_stats(x, rm, rv, w, b)
        return y.square().sum() + (m.square() + v).sum()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))
    (g1,) = torch.autograd.grad(compiled(x), x)
    (g2,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(g1, g2)


def test_bad_input():
    rm, rv, w, b = _params(3, 5)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        sk.batch_norm_stats(x[0], rm, rv, w, b)
    with pytest.raises(TypeError, match="floating"):
        sk.batch_norm_stats(x.int(), rm, rv, w, b)
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        sk.batch_norm_stats(x, rm, rv[:2], w, b)
    with pytest.raises(ValueError, match="weight requires grad"):
        sk.batch_norm_stats(x, rm, rv, w.clone().requires_grad_(True), b)
    with pytest.raises(ValueError, match="eps"):
        sk.batch_norm_stats(x, rm, rv, w, b, eps=-1.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        sk.batch_norm_stats(x, rm, rv, w, b, activation="gelu")
    with pytest.raises(NotImplementedError, match="no 'cuda' backend"):
        sk.batch_norm_stats(x, rm, rv, w, b, backend="cuda")


def _small_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 70, 1), nn.BatchNorm2d(70), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(70, 5))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval().requires_grad_(False).to(memory_format=torch.channels_last)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled cpu kernels")
def test_bnstats_fused_equals_hooked_path():
    net = _small_net()
    x0 = torch.randn(4, 3, 9, 9).contiguous(memory_format=torch.channels_last)
    results = {}
    for fused in (False, True):
        x = x0.clone().requires_grad_(True)
        with losses.BNStats(net, fused=fused) as st:
            out = net(x)
            assert (all(s is not None for s in st.stats) if fused
                    else all(s is None for s in st.stats))
            loss = losses.bns_loss(st.inputs, st.layers, stats=st.stats) + out.square().sum()
            (gx,) = torch.autograd.grad(loss, x)
        results[fused] = (out, loss, gx)
        assert all("forward" not in vars(m) for m in net.modules())  # restored on exit
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b)


def test_bnstats_leaves_other_layers_alone():
    class MyBN(nn.BatchNorm2d):  # its own forward: never replaced by the fused op
        def forward(self, x):
            return super().forward(x) * 2.0
    net = nn.Sequential(nn.Conv2d(1, 2, 1), MyBN(2), nn.BatchNorm2d(2)).eval()
    net.requires_grad_(False)
    x = torch.randn(2, 1, 3, 3)
    with losses.BNStats(net) as st:
        out = net(x)
        assert st.stats[0] is None  # custom forward
        assert st.stats[1] is not None or "cpu" not in BACKENDS
        with pytest.raises(RuntimeError, match="already wrapped"):
            losses.BNStats(net).__enter__()
    torch.testing.assert_close(out, net(x))
    net[2].weight.requires_grad_(True)
    with losses.BNStats(net) as st:
        net(x)
        assert st.stats == [None, None]  # a trained parameter: the fused op has no gradient
    net.train()
    with losses.BNStats(net) as st:
        net(x)
        assert st.stats == [None, None]  # training mode: BatchNorm normalizes by the batch


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled cpu kernels")
def test_synthesis_is_unchanged_by_fusing(tmp_path, monkeypatch):
    net = _small_net()
    cfg = synth.SynthConfig(num_images=6, batch_size=3, steps=4)
    images, calls = {}, []
    real = sk.batch_norm_stats

    def spy(*args, **kwargs):
        calls.append(kwargs.get("activation"))
        return real(*args, **kwargs)
    monkeypatch.setattr(sk, "batch_norm_stats", spy)
    for fused in (False, True):
        monkeypatch.setattr(synth, "BNStats", functools.partial(losses.BNStats, fused=fused))
        calls.clear()
        out = synth.synthesize(net, tmp_path / f"s{fused}.pt", (3, 9, 9), config=cfg,
                               progress=False)
        images[fused] = out["images"]
        # fused: every step's two BN layers ran the op, each with its ReLU
        assert calls == (["relu"] * len(calls) if fused else []) and (len(calls) > 0) == fused
    assert torch.equal(images[False], images[True])


class _Branchy(nn.Module):
    """bn1 feeds a ReLU and a residual (no ReLU fusion there); bn2 feeds only relu2, which
    also serves another call (a shared module); bn3 feeds a functional relu (not fused)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(6), nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        a = self.bn1(self.conv(x))
        b = self.relu1(a) + a
        c = self.relu2(self.bn2(b))
        return self.relu2(c - 0.5) + torch.relu(self.bn3(c))


def test_relu_fusion_only_where_the_bn_output_goes_to_relu_alone():
    net = _Branchy().eval().requires_grad_(False)
    found = losses._relus_after_bn(net)
    assert found == {id(net.bn2): net.relu2}

    class Untraceable(_Branchy):
        def forward(self, x):
            return super().forward(x) if x.sum() > -1e9 else x
    assert losses._relus_after_bn(Untraceable()) == {}

    six = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU6(), nn.BatchNorm2d(4),
                        nn.Hardtanh(0.0, 6.0))  # a Hardtanh that is not a ReLU6: not fused
    assert losses._relus_after_bn(six) == {id(six[1]): six[2]}

    class Stateful(_Branchy):  # a forward that keeps state: traced on a copy, not on it
        def forward(self, x):
            self.last = x
            return super().forward(x)
    net = Stateful()
    assert losses._relus_after_bn(net) == {id(net.bn2): net.relu2}
    assert not hasattr(net, "last")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled cpu kernels")
@pytest.mark.parametrize("cls", ["branchy", "untraceable"])
def test_bnstats_with_relu_fusion_equals_the_plain_model(cls):
    class Untraceable(_Branchy):
        def forward(self, x):
            return super().forward(x) if x.sum() > -1e9 else x
    torch.manual_seed(1)
    net = (_Branchy() if cls == "branchy" else Untraceable()).eval().requires_grad_(False)
    for bn in (net.bn1, net.bn2, net.bn3):
        bn.running_mean.uniform_(-0.3, 0.3)
    x0 = torch.randn(2, 3, 6, 6)
    results = {}
    for fused in (False, True):
        x = x0.clone().requires_grad_(True)
        with losses.BNStats(net, fused=fused) as st:
            out = net(x)
            loss = losses.bns_loss(st.inputs, st.layers, stats=st.stats) + out.square().sum()
            (gx,) = torch.autograd.grad(loss, x)
            wrapped = sum("forward" in vars(m) for m in (net.relu1, net.relu2))
        assert wrapped == (1 if fused and cls == "branchy" else 0)
        results[fused] = (out, loss, gx)
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no compiled cpu kernels")
def test_statistics_do_not_depend_on_the_thread_count():
    """Chunks are split over threads but merged in one order: the same bits at 1 and 2
    threads (channel_stats and the fused op alike)."""
    x = (torch.randn(7, 70, 23, 29) * 3 + 1).contiguous(memory_format=torch.channels_last)
    rm, rv, w, b = _params(70, 9)
    before = torch.get_num_threads()
    got = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            got.append((*sk.channel_stats(x, backend="cpu"),
                        *sk.batch_norm_stats(x, rm, rv, w, b, activation="relu6",
                                             backend="cpu")))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, c) for a, c in zip(*got))
    assert torch.equal(got[0][0], got[0][3]) and torch.equal(got[0][1], got[0][4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_channel_vectors(backend):
    """Running statistics, weight, bias and the statistics' gradients as strided views (the
    kernel reads contiguous copies): the same values as from contiguous ones (bit for bit on
    the cpu backend; F.batch_norm itself rounds strided parameters on another path)."""
    rm, rv, w, b = _params(5, 11)
    strided = [torch.stack([t, torch.full_like(t, 9.0)], 1)[:, 0] for t in (rm, rv, w, b)]
    assert not strided[1].is_contiguous()
    x = torch.randn(3, 5, 4, 4, requires_grad=True)
    gm, gv = torch.randn(5), torch.randn(5)
    outs = []
    for vecs, (g_mean, g_var) in ((strided, (torch.stack([gm, gm], 1)[:, 0],
                                             torch.stack([gv, gv], 1)[:, 0])),
                                  ((rm, rv, w, b), (gm, gv))):
        y, mean, var = sk.batch_norm_stats(x, vecs[0], vecs[1], vecs[2], vecs[3],
                                           activation="relu", backend=backend)
        (dx,) = torch.autograd.grad((y.sum(), mean, var), x, (None, g_mean, g_var))
        outs.append((y, mean, var, dx))
    for a, c in zip(*outs):
        if backend == "cpu":
            assert torch.equal(a, c)
        else:
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)

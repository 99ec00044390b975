"""synq.quant: quantizers, quantized layers and quantize_model on every supported architecture."""
import copy
import itertools

import pytest
import torch
from torch import nn

import synq_kernels
from synq.models import Add, mobilenet_v2, resnet18, resnet20, resnet50
from synq.quant import (ActQuantizer, QuantAct, QuantConv2d, QuantLinear, WeightQuantizer,
                        act_quantizers, calibrate, quant_layers, quantize_model,
                        set_calibration)


pytestmark = pytest.mark.usefixtures("one_thread")


def _counts(model):
    convs = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    acts = sum(type(m) in (nn.ReLU, nn.ReLU6) for m in model.modules())
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    return convs, acts, bns


# (builder, kwargs, input shape, conv+linear layers, ReLU modules)
ARCHS = {
    "resnet20": (resnet20, {"num_classes": 10, "in_channels": 1}, (2, 1, 28, 28), 22, 19),
    "resnet18": (resnet18, {"num_classes": 10}, (2, 3, 32, 32), 21, 17),
    "resnet50": (resnet50, {"num_classes": 10}, (1, 3, 32, 32), 54, 49),
    "mobilenet_v2": (mobilenet_v2, {"num_classes": 10}, (2, 3, 32, 32), 53, 35),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantize_model_architectures(arch):
    build, kwargs, shape, n_layers, n_acts = ARCHS[arch]
    torch.manual_seed(0)
    model = build(**kwargs).eval()
    before = copy.deepcopy(model.state_dict())
    convs, acts, bns = _counts(model)
    assert (convs, acts) == (n_layers, n_acts)

    q = quantize_model(model, wbits=4, abits=3, first_last_bits=8)

    # the input model is untouched
    assert not any(isinstance(m, (QuantConv2d, QuantLinear, QuantAct)) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # one quantized layer per Conv2d / Linear, one quantizer per ReLU / ReLU6
    layers = quant_layers(q)
    assert len(layers) == n_layers
    assert len(act_quantizers(q)) == n_acts
    names = list(layers)
    bits = [m.weight_quantizer.bits for m in layers.values()]
    assert bits[0] == 8 and bits[-1] == 8 and set(bits[1:-1]) == {4}
    assert {q_.bits for q_ in act_quantizers(q).values()} == {3}
    assert isinstance(layers[names[-1]], QuantLinear)
    # BatchNorm stays a float nn.BatchNorm2d with the same statistics
    q_bns = [m for m in q.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(q_bns) == bns and all(type(m) is nn.BatchNorm2d for m in q_bns)
    assert all(m.weight.dtype == torch.float32 for m in q_bns)
    # the float state dict still loads (same parameter names)
    q.load_state_dict(model.state_dict(), strict=False)
    # calibrate, then forward
    x = torch.randn(shape)
    calibrate(q, [x])
    with torch.no_grad():
        out = q(x)
    assert out.shape == (shape[0], 10) and torch.isfinite(out).all()
    assert not q.training


def test_residual_add_followed_by_relu_is_quantized():
    q = quantize_model(resnet20(10, 1), 4, 4)
    block = q.layer1[0]
    assert isinstance(block.add, Add) and isinstance(block.relu2, QuantAct)


def test_weight_quantizer_per_channel_asymmetric_minmax():
    torch.manual_seed(1)
    w = torch.randn(3, 2, 3, 3)
    w[1] += 2.0  # a channel whose values are all positive: the range still holds 0
    wq = WeightQuantizer(w, bits=3)
    out = wq(w)
    for c in range(3):
        lo = min(float(w[c].min()), 0.0)
        hi = max(float(w[c].max()), 0.0)
        scale = (hi - lo) / 7
        z = round(-lo / scale)
        expect = (torch.clamp(torch.round(w[c] / scale) + z, 0, 7) - z) * scale
        torch.testing.assert_close(out[c], expect, rtol=0, atol=1e-6)
        assert len(torch.unique(out[c])) <= 8
    # gradient: straight-through to the weight; the range itself gets none
    w.requires_grad_(True)
    wq(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("symmetric", [False, True])
def test_weight_quantizer_channels_last_weight(symmetric):
    """A channels-last weight (fine-tuning runs its models in channels-last) is reduced in
    memory order: the same per-channel range, output and gradient as a contiguous one."""
    torch.manual_seed(2)
    w = torch.randn(5, 3, 3, 4)
    w[2] *= 10  # one channel's range far from the others: a row mix-up shows
    w[4] += 3
    wq = WeightQuantizer(w, bits=4, symmetric=symmetric)
    outs = []
    for layout in (torch.contiguous_format, torch.channels_last):
        wl = w.clone(memory_format=layout).requires_grad_()
        assert torch.equal(torch.stack(wq._minmax_params(wl.detach())),
                           torch.stack(wq._minmax_params(w)))
        y = wq(wl)
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        outs.append((y.detach().contiguous(), wl.grad.contiguous()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_weight_quantizer_symmetric():
    w = torch.tensor([[-1.0, 0.5, 0.25], [2.0, -0.1, 0.0]])
    out = WeightQuantizer(w, bits=4, symmetric=True)(w)
    for c in range(2):
        scale = float(w[c].abs().max()) / 7
        expect = torch.clamp(torch.round(w[c] / scale), -8, 7) * scale
        torch.testing.assert_close(out[c], expect, rtol=0, atol=1e-6)


def test_act_quantizer_ema_then_frozen():
    q = ActQuantizer(bits=4)
    q.name = "relu"
    with pytest.raises(RuntimeError, match="relu"):
        q(torch.rand(4))  # never calibrated
    q.calibrating = True
    q(torch.tensor([0.0, 2.0]))
    assert float(q.running_max) == 2.0
    q(torch.tensor([0.0, 1.0, 4.0]))
    assert float(q.running_max) == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    assert float(q.running_min) == 0.0
    q.freeze()
    y = q(torch.tensor([0.0, 1.0, 10.0]))
    assert float(q.running_max) == pytest.approx(2.2)  # frozen: unchanged
    scale = 2.2 / 15
    assert float(y[2]) == pytest.approx(15 * scale)  # clamped at the top of the range
    assert float(y[1]) == pytest.approx(round(1.0 / scale) * scale)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_act_quantizer_observes_the_true_range_in_any_layout(layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 6, generator=g)
    x[1, 3, 2, 4], x[2, 0, 0, 1] = 7.5, -6.25  # the extremes, somewhere inside
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]  # every value, stride 2
    q = ActQuantizer(bits=8)
    q.calibrating = True
    q(x)
    assert float(q.running_min) == -6.25 and float(q.running_max) == 7.5


def test_calibration_switch_and_state_dict_keeps_ranges():
    torch.manual_seed(0)
    q = quantize_model(resnet20(10, 1), 4, 4)
    set_calibration(q, True)
    with torch.no_grad():
        q(torch.randn(4, 1, 16, 16))
    set_calibration(q, False)
    state = q.state_dict()
    assert any(k.endswith("quantizer.running_max") for k in state)
    q2 = quantize_model(resnet20(10, 1), 4, 4)
    q2.load_state_dict(state)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(q(x), q2(x))


def test_calibrated_flag_follows_load_state_dict_after_a_forward():
    """The flag's value is cached (no device read per forward) but never stale."""
    q = ActQuantizer(bits=4)
    with pytest.raises(RuntimeError, match="no range"):
        q(torch.rand(4))
    calibrated = ActQuantizer(bits=4)
    calibrated.calibrating = True
    calibrated(torch.tensor([0.0, 3.0]))
    calibrated.calibrating = False
    q.load_state_dict(calibrated.state_dict())
    torch.testing.assert_close(q(torch.tensor([1.0])), calibrated(torch.tensor([1.0])))
    q.load_state_dict(ActQuantizer(bits=4).state_dict())
    with pytest.raises(RuntimeError, match="no range"):
        q(torch.rand(4))


def test_inference_mode():
    """Inside torch.inference_mode: a model quantized, calibrated and run there holds
    normal tensors (the caches read version counters, which inference tensors lack), and a
    quantizer built there anyway (inference-tensor buffers) rebuilds what it caches instead
    of keeping a stale flag or range."""
    torch.manual_seed(2)
    x = torch.randn(2, 1, 28, 28)
    want = calibrate(quantize_model(resnet20(num_classes=10, in_channels=1), 4, 4), [x])(x)
    with torch.inference_mode():
        torch.manual_seed(2)
        _ = torch.randn(2, 1, 28, 28)
        q = calibrate(quantize_model(resnet20(num_classes=10, in_channels=1), 4, 4), [x])
        assert not any(t.is_inference() for t in q.state_dict().values())
        assert torch.equal(q(x), want) and torch.equal(q(x), want)
        a = ActQuantizer(bits=4)
        assert a.initialized.is_inference()
        with pytest.raises(RuntimeError, match="no range"):
            a(torch.rand(4))
        a.calibrating = True
        a(torch.tensor([0.0, 3.0]))
        a.calibrating = False
        first = a(torch.tensor([1.0]))
        a.running_max.fill_(6.0)         # in place, inside inference mode: no version bump
        assert not torch.equal(a(torch.tensor([1.0])), first)


def test_frozen_range_params_follow_every_change_of_the_range():
    """The scale / zero point of a frozen range are kept between forwards, never stale: an
    in-place change of the range, load_state_dict and a new calibration all show."""
    q = ActQuantizer(bits=4)
    q.calibrating = True
    q(torch.tensor([0.0, 1.5]))
    q.calibrating = False
    x = torch.linspace(-1.0, 5.0, 61)

    def want(lo, hi):
        scale = (hi - lo) / 15
        return torch.clamp(torch.round(x / scale) + round(-lo / scale), 0, 15) * scale \
            - round(-lo / scale) * scale

    torch.testing.assert_close(q(x), want(0.0, 1.5))
    torch.testing.assert_close(q(x), want(0.0, 1.5))  # from the kept parameters
    q.running_max.fill_(3.0)
    torch.testing.assert_close(q(x), want(0.0, 3.0))
    other = ActQuantizer(bits=4)
    other.calibrating = True
    other(torch.tensor([-1.0, 4.0]))
    q.load_state_dict(other.state_dict())
    torch.testing.assert_close(q(x), want(-1.0, 4.0))
    q.calibrating = True
    q(torch.tensor([-1.0, 14.0]))  # EMA: max 0.9 * 4 + 0.1 * 14 = 5
    q.calibrating = False
    torch.testing.assert_close(q(x), want(-1.0, 5.0))


@pytest.mark.parametrize("mode", ["lsq", "lsq+"])
def test_learnable_step_sizes(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    q = quantize_model(model, 4, 4, learnable=mode)
    conv = q[0]
    assert isinstance(conv.weight_quantizer.scale, nn.Parameter)
    assert isinstance(conv.weight_quantizer.zero_point, nn.Parameter) == (mode == "lsq+")
    assert conv.weight_quantizer.grad_factor == pytest.approx(1 / (9 * 15) ** 0.5)
    x = torch.randn(8, 1, 8, 8)
    calibrate(q, [x])
    aq = q[2].quantizer
    assert float(aq.scale.detach()) == pytest.approx(float(aq.running_max - aq.running_min) / 15,
                                            rel=1e-5)
    q(x).square().mean().backward()
    assert conv.weight_quantizer.scale.grad is not None
    assert conv.weight_quantizer.scale.grad.abs().sum() > 0
    assert aq.scale.grad is not None and conv.weight.grad is not None


def test_gradients_reach_weights_and_bn_affine():
    torch.manual_seed(0)
    q = quantize_model(resnet20(10, 1), 4, 4)
    x = torch.randn(4, 1, 12, 12)
    calibrate(q, [x])
    q(x).sum().backward()
    assert q.conv1.weight.grad is not None and q.conv1.weight.grad.abs().sum() > 0
    assert q.bn1.weight.grad is not None
    assert torch.equal(q.bn1.running_mean, torch.zeros(16))  # eval: statistics frozen


def test_backend_is_threaded_through():
    torch.manual_seed(0)
    model = resnet20(10, 1)
    x = torch.randn(2, 1, 12, 12)
    ref = quantize_model(model, 4, 4, backend="reference")
    assert {m.weight_quantizer.backend for m in quant_layers(ref).values()} == {"reference"}
    assert {m.backend for m in act_quantizers(ref).values()} == {"reference"}
    default = quantize_model(model, 4, 4)
    calibrate(ref, [x])
    calibrate(default, [x])
    with torch.no_grad():
        torch.testing.assert_close(ref(x), default(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no-such-backend"):
        quantize_model(model, 4, 4, backend="no-such-backend")


@pytest.mark.parametrize("kwargs", [{"wbits": 1}, {"wbits": 9}, {"abits": 0}, {"abits": 4.0},
                                    {"first_last_bits": 16}])
def test_bad_bits(kwargs):
    args = {"wbits": 4, "abits": 4, **kwargs}
    with pytest.raises(ValueError, match="from 2 to 8"):
        quantize_model(resnet20(10, 1), **args)


def test_unsupported_layers_are_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(),
                          nn.Sequential(nn.Conv3d(2, 2, 1)))
    with pytest.raises(ValueError, match=r"2\.0 \(Conv3d\)"):
        quantize_model(model, 4, 4)
    with pytest.raises(ValueError, match=r"1 \(GELU\)"):
        quantize_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU()), 4, 4)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(quantize_model(resnet20(10, 1), 4, 4), 4, 4)
    with pytest.raises(ValueError, match="learnable"):
        quantize_model(resnet20(10, 1), 4, 4, learnable="yes")


def test_hardswish_and_silu_get_quantizers_gates_stay_float():
    """Hardswish and SiLU outputs go negative (down to -0.375 and -0.278): their asymmetric
    grids hold that, and the fake-quantized values match the activation rounded to the grid."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardswish(), nn.Conv2d(4, 4, 1), nn.SiLU(),
                          nn.Conv2d(4, 4, 1), nn.Hardsigmoid(), nn.Flatten(), nn.Linear(36, 2))
    x = torch.randn(8, 3, 5, 5) * 3
    q = calibrate(quantize_model(model, 4, 4), [x])
    assert [type(m.act).__name__ for m in q.modules() if isinstance(m, QuantAct)] == \
        ["Hardswish", "SiLU"]
    assert type(q[5]) is nn.Hardsigmoid     # a gate: no quantizer, float
    act = q[1]
    assert float(act.quantizer.running_min) < -0.3
    with torch.no_grad():
        h = q[0](x)
        got = act(h)
    assert got.min() < 0 and len(torch.unique(got)) <= 16
    assert torch.allclose(got, nn.functional.hardswish(h), atol=float(got.unique().diff().max()))


def test_fake_quant_is_used(monkeypatch):
    calls = []
    real = synq_kernels.fake_quant

    def spy(*args, **kwargs):
        calls.append(kwargs.get("axis"))
        return real(*args, **kwargs)

    monkeypatch.setattr(synq_kernels, "fake_quant", spy)
    q = quantize_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()), 4, 4)
    calibrate(q, [torch.randn(2, 1, 5, 5)])
    assert calls == [0, None]  # weight per channel (axis 0), activation per tensor


@pytest.mark.parametrize("learnable", [None, "lsq+"])
def test_quantizers_are_made_on_the_models_device(learnable):
    # A model moved to a GPU before quantize_model must get its activation ranges there too
    # (found on an H100: CPU range buffers beside CUDA activations). The meta device stands
    # in for the GPU here: every tensor of the quantized copy must be where the model was.
    model = resnet20(num_classes=10, in_channels=1).to("meta")
    q = quantize_model(model, 4, 4, learnable=learnable)
    placed = {n: t.device.type for n, t in itertools.chain(q.named_parameters(),
                                                             q.named_buffers())}
    assert any("quantizer" in n for n in placed)
    assert set(placed.values()) == {"meta"}, {n: d for n, d in placed.items() if d != "meta"}


@pytest.mark.parametrize("learnable", [None, "lsq+"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_activation_gives_the_unfused_bits(monkeypatch, learnable, channels_last):
    """A calibrated QuantAct runs its ReLU / ReLU6 inside fake_quant: outputs and every
    gradient (weights, BN affine, learnable steps) are the same bits as act then fake_quant."""
    import synq.quant as Q
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    x = torch.randn(6, 3, 9, 7) * 3
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), \
            x.contiguous(memory_format=torch.channels_last)
    q = quantize_model(model, 4, 4, learnable=learnable)
    calibrate(q, [x])
    runs = []
    for fusable in (dict(Q.FUSED_ACTIVATIONS), {}):
        monkeypatch.setattr(Q, "FUSED_ACTIVATIONS", fusable)
        m = copy.deepcopy(q).train()
        calls = []
        real = synq_kernels.fake_quant
        monkeypatch.setattr(synq_kernels, "fake_quant",
                            lambda *a, **k: calls.append(k.get("activation")) or real(*a, **k))
        y = m(x)
        y.square().sum().backward()
        monkeypatch.setattr(synq_kernels, "fake_quant", real)
        runs.append((y.detach(), {n: p.grad for n, p in m.named_parameters()}, calls))
    (y1, g1, c1), (y2, g2, c2) = runs
    assert "relu" in c1 and "relu6" in c1 and set(c2) == {None}  # fused, then not
    assert torch.equal(y1, y2)
    assert g1.keys() == g2.keys()
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


def test_reference_backend_keeps_the_activation_apart(monkeypatch):
    calls = []
    real = synq_kernels.fake_quant
    monkeypatch.setattr(synq_kernels, "fake_quant",
                        lambda *a, **k: calls.append(k.get("activation")) or real(*a, **k))
    fused = synq_kernels.backends.resolve("fake_quant", torch.device("cpu"), None) != "reference"
    for backend, want in (("reference", None), (None, "relu" if fused else None)):
        calls.clear()
        q = quantize_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), 4, 4, backend=backend)
        calibrate(q, [torch.randn(2, 1, 5, 5)])
        q(torch.randn(2, 1, 5, 5))
        assert calls[-1] == want


class _SharedReluBlock(nn.Module):
    """torchvision's BasicBlock pattern: one ReLU module called after the first conv and again
    after the residual add (`separate=True`: a module per call, the same function;
    `alias=True`: the second call through a second name of the same module)."""

    def __init__(self, c, separate=False, alias=False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        if separate or alias:
            self.relu2 = nn.ReLU(inplace=True) if separate else self.relu

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return (self.relu2 if hasattr(self, "relu2") else self.relu)(out)


def _shared_relu_model(separate, alias=False):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                          _SharedReluBlock(4, separate, alias),
                          _SharedReluBlock(4, separate, alias), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.mark.parametrize("alias", [False, True])
def test_a_relu_called_twice_gets_a_range_per_call(alias):
    shared, separate = _shared_relu_model(False, alias), _shared_relu_model(True)
    x = torch.randn(8, 1, 9, 9)
    qs, qp = quantize_model(shared, 4, 4), quantize_model(separate, 4, 4)
    block = qs[2].relu
    assert len(block.extra_quantizers) == 1 and block.extra_quantizers[0].name == "2.relu (call 2)"
    if alias:  # both names lead to the one quantized module
        assert qs[2].relu2 is block and type(block.act) is nn.ReLU
    calibrate(qs, [x, x * 0.5])
    calibrate(qp, [x, x * 0.5])
    # each call keeps its own range: the same as a module per call
    assert torch.equal(block.quantizer.running_max, qp[2].relu.quantizer.running_max)
    assert torch.equal(block.extra_quantizers[0].running_max, qp[2].relu2.quantizer.running_max)
    assert not torch.equal(block.quantizer.running_max, block.extra_quantizers[0].running_max)
    with torch.no_grad():
        assert torch.equal(qs(x), qp(x))
        assert torch.equal(qs(x), qs(x))  # the call count restarts at every forward
    # learnable steps follow too, and the state dict round-trips
    copy_ = quantize_model(shared, 4, 4)
    copy_.load_state_dict(qs.state_dict())
    for q in act_quantizers(copy_).values():
        q.calibrating = False
    with torch.no_grad():
        assert torch.equal(copy_(x), qs(x))
        assert torch.equal(copy.deepcopy(qs)(x), qs(x))
    # the integer export keeps a grid per call: the same integer model as a module per call
    from synq.deploy import export
    ints = [export(q, x[:1]) for q in (qs, qp)]
    assert ints[0].model.get_submodule("2.relu").calls == 2
    with torch.no_grad():
        for _ in range(3):  # eager, recording, replay
            assert torch.equal(ints[0](x), ints[1](x))


def test_untraceable_shared_relu_warns_at_calibration():
    class Untraceable(_SharedReluBlock):
        def forward(self, x):
            if x.sum() > -1e30:  # data-dependent: torch.fx cannot trace it
                return super().forward(x)
            return x

    torch.manual_seed(0)
    q = quantize_model(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Untraceable(4)), 4, 4)
    assert len(q[1].relu.extra_quantizers) == 0
    with pytest.warns(UserWarning, match=r"runs more than 1 time\(s\) per forward"):
        calibrate(q, [torch.randn(2, 1, 6, 6)])


def test_a_layer_registered_twice_is_quantized_under_both_names():
    shared = nn.Conv2d(4, 4, 3, padding=1)
    relu = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), relu, shared, relu, shared).eval()
    q = quantize_model(model, 4, 4)
    assert q[2] is q[4] and isinstance(q[2], QuantConv2d)
    assert q[1] is q[3] and isinstance(q[1], QuantAct) and len(q[1].extra_quantizers) == 1
    for name, m in q.named_modules(remove_duplicate=False):
        assert type(m) not in (nn.Conv2d, nn.Linear) or name.endswith(".act"), name

"""synq.deploy: BatchNorms that cannot be folded into a conv (DenseNet, pre-activation ResNets)
run in float, and tensors that code outside the modules reads (`torch.cat` in a forward) are
neither folded into nor passed on as int8.

Agreement is the relative logit error of tests/test_deploy.py: max |int - fq| / max |fq|."""

import importlib
import warnings

import pytest
import torch
from torch import nn

from synq.deploy import FloatBatchNorm2d, export, load_int, save_int
from synq.quant import calibrate, quantize_model

from test_deploy import _randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")

_DENSE_MODULE = """
import torch
from torch import nn
from torch.nn import functional as F
from synq.models import Add

class DenseLayer(nn.Module):  # torchvision's _DenseLayer: BN -> ReLU -> conv on a concatenation
    def __init__(self, c, growth):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(c), nn.ReLU()
        self.conv1 = nn.Conv2d(c, 8, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(8), nn.ReLU()
        self.conv2 = nn.Conv2d(8, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))

class PreActBlock(nn.Module):  # BN -> ReLU -> conv twice, then the identity added
    def __init__(self, c):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(c), nn.ReLU()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(c), nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.add = Add()

    def forward(self, x):
        return self.add(x, self.conv2(self.relu2(self.bn2(self.conv1(self.relu1(self.bn1(x)))))))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0, self.norm0, self.relu0 = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.pool0 = nn.MaxPool2d(2)
        self.layers = nn.ModuleList([DenseLayer(8, 4), DenseLayer(12, 4)])
        self.trans = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 12, 1, bias=False),
                                   nn.AvgPool2d(2))
        self.block = PreActBlock(12)
        self.norm5 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        features = [self.pool0(self.relu0(self.norm0(self.conv0(x))))]
        for layer in self.layers:
            features.append(layer(features))
        x = self.block(self.trans(torch.cat(features, 1)))
        x = F.relu(self.norm5(x), inplace=True)   # functional, in place: torchvision's
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

def model():
    return Net()
"""

_STANDALONE = {"layers.0.norm1", "layers.1.norm1", "trans.0", "block.bn1", "norm5"}


def _randomized(model, seed=0):
    """Random BatchNorm statistics and affine parameters (test_deploy's), in eval mode."""
    return _randomize_bn(model, seed)


def _rel_err(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("bits, bound", [(8, 0.02), (4, 0.15)])
def test_densenet_and_pre_activation_export(tmp_path, monkeypatch, bits, bound):
    """BatchNorms after a concatenation or an addition stay float (eval mode), those right
    after a conv fold; fused mode stays on; save / load gives the same outputs. Measured
    relative logit error: 0.0038 at 8 bits, 0.0054 at 4 bits."""
    (tmp_path / "dense_net.py").write_text(_DENSE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = _randomized(importlib.import_module("dense_net").model())
    x = torch.randn(16, 3, 13, 11)
    q = calibrate(quantize_model(model, bits, bits), [x])
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # fused mode kept: it gives the unfused result
        im = export(q)
    assert im.plan["fused"]
    floats = {n for n, m in im.model.named_modules() if isinstance(m, FloatBatchNorm2d)}
    assert floats == _STANDALONE
    assert {n for n, i in im.plan["layers"].items() if i["bn"]} == {
        "conv0", "layers.0.conv1", "layers.1.conv1", "block.conv1"}
    assert not any(isinstance(m, nn.BatchNorm2d) and not isinstance(m, FloatBatchNorm2d)
                   for m in im.model.modules())
    # BN -> ReLU -> conv: the ReLU's quantization applies the BN (norm5's ReLU is functional)
    deferred = {n for n, m in im.model.named_modules() if getattr(m, "defer", False)
                and isinstance(m, FloatBatchNorm2d)}
    assert deferred == _STANDALONE - {"norm5"}
    assert im.plan["acts"]["trans.1"]["bn"] == "trans.0"
    unfused = export(q, fuse=False)
    assert not any(getattr(m, "defer", False) for m in unfused.model.modules())
    with torch.no_grad():
        want = q(x)
        outs = [im(x) for _ in range(3)]    # eager, recorded, replayed
    assert _rel_err(want, outs[0]) < bound
    assert all(torch.equal(o, outs[0]) for o in outs)
    with torch.no_grad():
        assert _rel_err(unfused(x), outs[0]) < bound / 2
    save_int(im, tmp_path / "int", model_spec={"source": "callable", "target": "dense_net:model",
                                               "kwargs": {}})
    back = load_int(tmp_path / "int")
    assert {n for n, m in back.model.named_modules() if isinstance(m, FloatBatchNorm2d)} \
        == _STANDALONE
    assert {n for n, m in back.model.named_modules() if getattr(m, "defer", False)
            and isinstance(m, FloatBatchNorm2d)} == deferred
    with torch.no_grad():
        assert torch.equal(back(x), outs[0])


class _ConvReadTwice(nn.Module):
    """A conv whose output a BatchNorm takes and something else reads too: `how` = "module"
    (another conv), "cat" (torch.cat in the forward, which no hook sees), "setitem" (a slice
    assignment into a buffer), "caught" (torch.cat after a module whose exception the forward
    catches) or "returned" (the forward returns it beside the logits)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.side = nn.Conv2d(4, 4, 1) if how == "module" else None
        self.probe = nn.MaxPool2d(50) if how == "caught" else None   # larger than the input
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = self.conv(x)
        z = self.relu(self.bn(y))
        if self.how == "caught":
            try:
                self.probe(y)
            except RuntimeError:
                pass
        other = self.side(y) if self.how == "module" else y
        if self.how == "setitem":
            both = torch.empty(z.shape[0], 8, *z.shape[2:])
            both[:, :4], both[:, 4:] = z, other
        else:
            both = torch.cat([z, other], 1)
        out = self.head(both).mean((2, 3))
        return (out, y) if self.how == "returned" else out


@pytest.mark.parametrize("how", ["module", "cat", "setitem", "caught", "returned"])
def test_bn_not_folded_into_a_conv_whose_output_is_read_elsewhere(how):
    """Folding would hand the BN's output (and its ReLU) to the conv's other reader too."""
    torch.manual_seed(1)
    model = _randomized(_ConvReadTwice(how), seed=3)
    x = torch.randn(8, 3, 9, 9)
    q = calibrate(quantize_model(model, 8, 8), [x])
    with warnings.catch_warnings():
        # (a tuple output turns fused mode off, with a warning)
        warnings.simplefilter("ignore" if how == "returned" else "error")
        im = export(q)
    assert im.plan["fused"] == (how != "returned")
    assert im.plan["layers"]["conv"]["bn"] is None and not im.plan["layers"]["conv"]["relu"]
    assert isinstance(im.model.bn, FloatBatchNorm2d)
    with torch.no_grad():
        want, got = q(x), im(x)
    if how == "returned":
        assert _rel_err(want[1], got[1]) < 0.02
        want, got = want[0], got[0]
    assert _rel_err(want, got) < 0.02


class _ChangedAfterBN(nn.Module):
    """The BatchNorm's input changed in place after the BN ran, before its ReLU does."""

    def __init__(self):
        super().__init__()
        self.conv0, self.relu0 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.bn, self.relu, self.conv = nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        t = self.relu0(self.conv0(x)) * 1.0
        b = self.bn(t)
        t.add_(0.5)
        return self.conv(self.relu(b)).mean((2, 3)) + t.mean()


def test_bn_input_changed_in_place_is_not_deferred():
    torch.manual_seed(4)
    model = _randomized(_ChangedAfterBN(), seed=5)
    x = torch.randn(8, 3, 9, 9)
    q = calibrate(quantize_model(model, 8, 8), [x])
    im = export(q)
    assert "bn" not in im.plan["acts"]["relu"] and not im.model.bn.defer
    with torch.no_grad():
        assert _rel_err(q(x), im(x)) < 0.02


@pytest.mark.parametrize("kw", [{"affine": False}, {"track_running_stats": False}])
def test_unfoldable_bn_after_a_conv_runs_in_float(kw):
    """A BatchNorm without affine parameters or running statistics (batch statistics even in
    eval mode) right after a conv: not folded (it crashed the fold before)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, **kw), nn.ReLU(),
                          nn.Conv2d(4, 5, 3), nn.Flatten(), nn.Linear(5 * 5 * 5, 3)).eval()
    x = torch.randn(8, 3, 9, 9)
    q = calibrate(quantize_model(model, 8, 8), [x])
    im = export(q, example=x[:1])
    assert im.plan["layers"]["0"]["bn"] is None and isinstance(im.model[1], FloatBatchNorm2d)
    with torch.no_grad():
        assert _rel_err(q(x), im(x)) < 0.02


@torch.no_grad()
def test_mul_add_cache_follows_eps_and_data():
    bn = _randomized(FloatBatchNorm2d(6))
    want = lambda: (1.0 / torch.sqrt(bn.running_var + bn.eps) * bn.weight,  # noqa: E731
                    bn.bias - bn.running_mean * (1.0 / torch.sqrt(bn.running_var + bn.eps)
                                                 * bn.weight))
    for change in (lambda: None, lambda: setattr(bn, "eps", 0.5),
                   lambda: setattr(bn.running_var, "data", bn.running_var * 2),
                   lambda: bn.weight.mul_(3)):
        change()
        for got, ref in zip(bn.mul_add(), want()):
            assert torch.equal(got, ref.detach())


class _LooseReaders(nn.Module):
    """A conv whose output goes to its ReLU quantizer and to torch.cat in the forward, and a
    ReLU whose quantized output goes to a conv and to torch.cat."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        y = self.conv1(x)
        a = self.relu1(y)
        b = self.relu2(self.conv2(a))
        return self.head(torch.cat([y, a, b], 1)).mean((2, 3))


def test_tensors_read_outside_modules_stay_float():
    """Neither a deferred conv result nor an int8 activation reaches torch.cat, and conv1
    does not apply relu1 in its epilogue (torch.cat reads its output before the ReLU): fused
    mode stays on for the rest (before, the whole model fell back to unfused mode with a
    warning)."""
    torch.manual_seed(2)
    x = torch.randn(8, 3, 9, 9)
    q = calibrate(quantize_model(_LooseReaders().eval(), 8, 8), [x])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        im = export(q)
    plan = im.plan
    assert plan["fused"]
    assert not plan["layers"]["conv1"]["defer"] and not plan["layers"]["conv1"]["relu"]
    assert plan["layers"]["conv2"]["defer"] and plan["layers"]["conv2"]["relu"]
    assert plan["acts"]["relu1"]["emit_int"] is False
    with torch.no_grad():
        assert _rel_err(q(x), im(x)) < 0.02


def test_densenet_style_fine_tunes_and_exports(tmp_path, monkeypatch):
    """SynQ fine-tuning (CAM on the final BatchNorm, which find_cam_layer picks where the last
    ReLU is a function) and the export of the result, end to end."""
    from synq.finetune import FinetuneConfig, find_cam_layer, finetune
    (tmp_path / "dense_net_ft.py").write_text(_DENSE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = _randomized(importlib.import_module("dense_net_ft").model())
    assert find_cam_layer(model, torch.zeros(1, 3, 16, 16)) == "norm5"
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 5, (64,))
    res = finetune(model, (x, y), FinetuneConfig(wbits=4, abits=4, epochs=2, calib_epochs=1,
                                                 iters_per_epoch=2, batch_size=32),
                   progress=False)
    assert res.history[-1]["cam"] > 0
    im = export(res.student, example=x[:1])
    assert im.plan["fused"]
    with torch.no_grad():
        assert _rel_err(res.student(x), im(x)) < 0.15


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_dense_export_on_cuda(tmp_path, monkeypatch):
    """The float BatchNorms on a GPU: applied before Triton's quantization (or by the
    reference's ops without Triton), the same plan as on the CPU."""
    (tmp_path / "dense_net_cuda.py").write_text(_DENSE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = _randomized(importlib.import_module("dense_net_cuda").model()).cuda()
    x = torch.randn(16, 3, 13, 11, device="cuda")
    for bits, bound in ((8, 0.03), (4, 0.2)):
        q = calibrate(quantize_model(model, bits, bits), [x])
        im = export(q)
        assert im.plan["fused"] and im.plan["acts"]["trans.1"]["bn"] == "trans.0"
        with torch.no_grad():
            want, got = q(x), im(x)
        assert got.device.type == "cuda" and _rel_err(want, got) < bound

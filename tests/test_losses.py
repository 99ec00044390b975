"""synq.losses (each against a hand computation on tiny tensors) and synq.filters."""
import math

import pytest
import torch
from torch import nn

from synq import filters
from synq.losses import (ActivationCapture, BNStats, attention_map, bns_loss, cam_loss,
                         check_tau, difficulty, easy_ce, feature_attention_loss, focal_ce,
                         gradcam_map, kd_loss, lbns_loss)


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_bns_loss_by_hand():
    bn = nn.BatchNorm2d(2)
    bn.running_mean.copy_(torch.tensor([1.0, 0.0]))
    bn.running_var.copy_(torch.tensor([2.0, 1.0]))
    # channel 0 holds {0, 2, 4, 6}: mean 3, biased var 5; channel 1 holds {1, 1, 1, 1}: 1, 0
    x = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]], [[[4.0, 6.0]], [[1.0, 1.0]]]])
    assert x.shape == (2, 2, 1, 2)
    mse_mean = ((3 - 1) ** 2 + (1 - 0) ** 2) / 2
    mse_var = ((5 - 2) ** 2 + (0 - 1) ** 2) / 2
    assert float(bns_loss([x], [bn])) == pytest.approx(mse_mean + mse_var)
    # averaged over layers, with optional per-layer weights
    assert float(bns_loss([x, x], [bn, bn], weights=[0.2, 1.0])) == pytest.approx(
        0.6 * (mse_mean + mse_var))


def test_bn_stats_captures_inputs_and_goes_away():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.BatchNorm2d(2))
    with BNStats(model) as stats:
        model(torch.randn(2, 1, 3, 3))
        assert len(stats.inputs) == 2 and stats.inputs[0].shape == (2, 2, 3, 3)
    assert all(len(m._forward_hooks) == 0 and "forward" not in vars(m)
               for m in model.modules())
    assert stats.inputs == [None, None] and stats.stats == [None, None]
    with pytest.raises(ValueError, match="BatchNorm"):
        BNStats(nn.Sequential(nn.Conv2d(1, 2, 1)))


def test_focal_ce_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    gamma = 0.5
    expect = 0.0
    for row, label in zip(logits.tolist(), y.tolist()):
        p = _softmax(row)[label]
        expect += (1 - p) ** gamma * -math.log(p)
    assert float(focal_ce(logits, y, gamma)) == pytest.approx(expect / 2, rel=1e-6)
    assert float(focal_ce(logits, y, 0.0)) == pytest.approx(
        float(nn.functional.cross_entropy(logits, y)), rel=1e-6)


def test_kd_loss_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    temp, alpha = 2.0, 3.0
    kl = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        ps = _softmax([v / temp for v in srow])
        pt = _softmax([v / temp for v in trow])
        kl += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    expect = kl / 2 * alpha * temp ** 2
    assert float(kd_loss(s, t, temp, alpha)) == pytest.approx(expect, rel=1e-6)
    assert float(kd_loss(t, t, temp, alpha)) == pytest.approx(0.0, abs=1e-7)


def test_difficulty_and_easy_only_ce():
    t = torch.tensor([[4.0, 0.0], [0.0, 0.0], [0.0, 4.0]])
    y = torch.tensor([0, 0, 0])
    delta = difficulty(t, y)
    p0 = _softmax([4.0, 0.0])[0]
    torch.testing.assert_close(delta, torch.tensor([1 - p0, 0.5, p0]), rtol=1e-6, atol=1e-7)
    easy = delta < 0.5  # only the first sample (delta = 0.5 is hard)
    assert easy.tolist() == [True, False, False]
    s = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 5.0]], requires_grad=True)
    ce = easy_ce(s, y, easy)
    assert float(ce.detach()) == pytest.approx(-math.log(_softmax([1.0, 0.0])[0]), rel=1e-6)
    ce.backward()
    assert torch.equal(s.grad[1:], torch.zeros(2, 2))  # hard samples get no CE gradient
    # two easy samples: the mean over those two, not over the batch
    both = torch.tensor([True, True, False])
    expect = (-math.log(_softmax([1.0, 0.0])[0]) - math.log(_softmax([0.0, 3.0])[0])) / 2
    assert float(easy_ce(s.detach(), y, both)) == pytest.approx(expect, rel=1e-6)
    # no easy sample: zero, no NaN, still differentiable
    s.grad = None
    none = easy_ce(s, y, torch.zeros(3, dtype=torch.bool))
    none.backward()
    assert float(none.detach()) == 0.0 and torch.equal(s.grad, torch.zeros(3, 2))


def test_check_tau():
    assert check_tau(1.0) == 1.0
    for bad in (0.0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="tau"):
            check_tau(bad)


def test_gradcam_map_by_hand():
    # two channels 2x2; gradients with spatial means 1 and -0.5
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[2.0, 2.0], [0.0, 8.0]]]])
    g = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]]])
    cam = gradcam_map(a, g, (2, 2), eps=0.0)
    raw = torch.tensor([[1 - 1.0, 2 - 1.0], [3 - 0.0, 4 - 4.0]]).clamp(min=0)  # ReLU
    expect = (raw - raw.min()) / (raw.max() - raw.min())
    torch.testing.assert_close(cam[0], expect)
    # upsampling to 4x4 (bilinear, align_corners=False) keeps the corners' order
    big = gradcam_map(a, g, (4, 4))
    assert big.shape == (1, 4, 4) and float(big.max()) == pytest.approx(1.0, abs=1e-6)
    # a flat map (all activations zero after ReLU) gives zeros, not NaN
    flat = gradcam_map(-a.abs(), torch.ones_like(a), (2, 2))
    assert torch.equal(flat, torch.zeros(1, 2, 2))


def test_gradcam_gradient_flows_to_activation_only():
    a = torch.rand(2, 3, 2, 2, requires_grad=True)
    g = torch.rand(2, 3, 2, 2, requires_grad=True)
    target = torch.rand(2, 4, 4)
    loss = cam_loss(gradcam_map(a, g, (4, 4)), target)
    loss.backward()
    assert a.grad is not None and g.grad is None
    assert float(cam_loss(target, target)) == 0.0


def test_cam_loss_by_hand():
    s = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
    t = torch.tensor([[[1.0, 1.0], [0.0, 0.5]]])
    assert float(cam_loss(s, t)) == pytest.approx((1 + 0 + 0.25 + 0) / 4)


def test_attention_and_feature_attention_by_hand():
    f = torch.tensor([[[[1.0, 0.0]], [[1.0, 2.0]]]])  # 1 x 2 x 1 x 2
    # channel mean of squares: [(1 + 1) / 2, (0 + 4) / 2] = [1, 2], L2-normalized
    torch.testing.assert_close(attention_map(f), torch.tensor([[1.0, 2.0]]) / math.sqrt(5))
    g = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]]]])  # attention [1, 1] / sqrt(2)
    diff = torch.tensor([1 / math.sqrt(5) - 1 / math.sqrt(2), 2 / math.sqrt(5) - 1 / math.sqrt(2)])
    expect = float(diff.pow(2).mean())
    assert float(feature_attention_loss([f, f], [g, g])) == pytest.approx(2 * expect, rel=1e-6)


def test_lbns_loss_by_hand():
    x = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]])  # 2 samples, 1 channel: (2, 1), (0, 0)
    y = torch.tensor([1, 0])
    cm = torch.tensor([[0.5], [1.0]])  # centre means per class
    cv = torch.tensor([[0.0], [2.0]])
    mean_err = ((2 - 1.0) ** 2 + (0 - 0.5) ** 2) / 2
    var_err = ((1 - 2.0) ** 2 + (0 - 0.0) ** 2) / 2
    assert float(lbns_loss([x], y, [cm], [cv])) == pytest.approx(mean_err + var_err)


def test_activation_capture_leaf_and_cleanup():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    model.requires_grad_(False)
    with ActivationCapture(model, ["0"], make_leaf=True) as cap:
        out = model(torch.randn(1, 1, 2, 2))
        a = cap.outputs["0"]
        (g,) = torch.autograd.grad(out.sum(), a)
        assert g.shape == a.shape
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    with pytest.raises(ValueError, match="'nope'"):
        ActivationCapture(model, ["nope"])


# ------------------------------------------------------------------------------------------
# synq.filters (calls synq_kernels.lowpass)

needs_lowpass = pytest.mark.skipif(not filters.has_lowpass(),
                                   reason="synq_kernels.lowpass is not available yet")


@needs_lowpass
@pytest.mark.parametrize("mask", ["gaussian", "ideal"])
def test_lowpass_matches_the_fft_formula(mask):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6)
    d0 = 2.5
    h, w = x.shape[-2:]
    i = torch.arange(h, dtype=torch.float64).view(-1, 1) - h // 2
    j = torch.arange(w, dtype=torch.float64).view(1, -1) - w // 2
    r2 = i * i + j * j
    m = torch.exp(-r2 / (2 * d0 * d0)) if mask == "gaussian" else (r2 <= d0 * d0).double()
    spec = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))
    expect = torch.fft.ifft2(torch.fft.ifftshift(m * spec, dim=(-2, -1))).real.float()
    torch.testing.assert_close(filters.lowpass(x, d0, mask), expect, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(filters.lowpass(x, d0, mask, backend="reference"), expect,
                               rtol=1e-4, atol=1e-5)


@needs_lowpass
def test_lowpass_is_differentiable_and_checks_arguments():
    x = torch.randn(1, 1, 5, 5, requires_grad=True)
    filters.lowpass(x, 2.0).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="d0"):
        filters.lowpass(x, 0.0)
    with pytest.raises(ValueError, match="mask"):
        filters.lowpass(x, 2.0, mask="butterworth")

"""synq.finetune and synq.evaluate: an end-to-end run on sklearn's digits, resume, switches,
hooks and bad configuration."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from synq import filters
from synq.data import digits_datasets
from synq.evaluate import compare, evaluate, format_report
from synq.finetune import FinetuneConfig, find_cam_layer, finetune
from synq.models import resnet20
from synq.quant import QuantConv2d, calibrate, quantize_model
from synq.synth import synthesize

needs_lowpass = pytest.mark.skipif(not filters.has_lowpass(),
                                   reason="synq_kernels.lowpass is not available yet")
LOWPASS = filters.has_lowpass()


pytestmark = pytest.mark.usefixtures("one_thread")


def _digits_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits():
    """(teacher trained for a few seconds, train set, test set)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, test = digits_datasets()
    model = _digits_cnn()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x, y = train.tensors
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.set_num_threads(old)
    return model.eval(), train, test


@pytest.fixture(scope="module")
def synthetic(digits, tmp_path_factory):
    teacher = digits[0]
    path = tmp_path_factory.mktemp("syn") / "digits_syn.pt"
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    synthesize(teacher, path, (1, 8, 8), num_images=128, batch_size=64, steps=60, beta=0.1,
               progress=False)
    torch.set_num_threads(old)
    return path


SMALL = dict(wbits=4, abits=4, epochs=3, calib_epochs=1, iters_per_epoch=6, batch_size=32,
             lr=1e-4, d0=3.0, use_lowpass=LOWPASS)


def test_end_to_end_digits_beats_chance(digits, synthetic):
    teacher, _, test = digits
    fp = evaluate(teacher, test)
    assert fp["top1"] > 85 and fp["n"] == len(test)
    before = copy.deepcopy(teacher.state_dict())
    result = finetune(teacher, synthetic, wbits=3, abits=3, epochs=4, calib_epochs=1,
                      iters_per_epoch=10, batch_size=64, lr=1e-4, d0=3.0, use_lowpass=LOWPASS,
                      eval_data=test, progress=False)
    assert result.top1 > 60, result.top1  # chance is 10%
    assert result.n == len(test) and result.top5 >= result.top1
    assert [h["phase"] for h in result.history] == ["calibrate", "train", "train", "train"]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history[1:])
    assert "cam" in result.history[-1] and "easy" in result.history[-1]
    # the teacher is untouched: weights, requires_grad, no hooks left behind
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.requires_grad for p in teacher.parameters())
    for model in (teacher, result.student):
        assert all(len(m._forward_hooks) == 0 for m in model.modules())
    # the student is quantized, in eval mode, and its report reads
    assert any(isinstance(m, QuantConv2d) for m in result.student.modules())
    assert not result.student.training
    report = compare(teacher, result.student, test)
    assert report["quant"]["top1"] == pytest.approx(result.top1)
    assert "| float |" in format_report(report)


def test_resume_after_interruption_matches_uninterrupted_run(digits, synthetic, tmp_path):
    teacher = digits[0]
    cfg = FinetuneConfig(**SMALL, learnable="lsq+", seed=3)
    full = finetune(teacher, synthetic, cfg, checkpoint=tmp_path / "full.pt", progress=False)

    def interrupt(epoch, entry):
        if epoch == 1:
            raise KeyboardInterrupt

    ckpt = tmp_path / "cut.pt"
    with pytest.raises(KeyboardInterrupt):
        finetune(teacher, synthetic, cfg, checkpoint=ckpt, progress=False,
                 on_epoch_end=interrupt)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 2
    resumed = finetune(teacher, synthetic, cfg, checkpoint=ckpt, resume=True, progress=False)
    a, b = full.student.state_dict(), resumed.student.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in full.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history]
    # a checkpoint from another configuration is refused
    with pytest.raises(ValueError, match="config"):
        finetune(teacher, synthetic, cfg, checkpoint=ckpt, resume=True, progress=False,
                 lr=2e-4)


def test_steady_state_iterations_do_not_wait_for_the_device(digits, synthetic, monkeypatch):
    """Host reads of tensor values (each a GPU sync) in a fine-tuning run: per-layer scale
    checks and running statistics would make dozens per iteration; allowed are the easy-sample
    count (one per iteration) and a few per epoch."""
    teacher = digits[0]
    reads = []
    for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            reads.append(1)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    per_epoch = []
    cfg = dict(SMALL, epochs=3, iters_per_epoch=6, learnable="lsq")
    finetune(teacher, synthetic, progress=False,
             on_epoch_end=lambda e, h: (per_epoch.append(len(reads)), reads.clear()), **cfg)
    calib, train = per_epoch[0], per_epoch[1:]
    assert max(train) <= 6 + 5, per_epoch
    assert calib <= 40, per_epoch  # the first forward reads each quantizer's flag once


def test_divergence_stops_before_the_checkpoint(digits, synthetic, tmp_path):
    teacher = copy.deepcopy(digits[0])
    poisoned = []  # the teacher's outputs turn to NaN from the 3rd epoch on
    teacher[-1].register_forward_hook(lambda m, a, out: out * float("nan") if poisoned else out)
    ckpt = tmp_path / "run.pt"
    cfg = dict(SMALL, epochs=4, iters_per_epoch=2)
    with pytest.raises(FloatingPointError, match=r"diverged in epoch 3/4.*lower lr"):
        finetune(teacher, synthetic, checkpoint=ckpt, progress=False, **cfg,
                 on_epoch_end=lambda e, h: poisoned.append(1) if e == 1 else None)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 2


def test_non_finite_data_is_reported_by_calibration(digits):
    _, train, _ = digits
    x, y = train.tensors
    x = x[:64].clone()
    x[5, 0, 3, 3] = float("inf")
    with pytest.raises(FloatingPointError, match=r"calibration \(epoch 1/2\).*non-finite logits for \d+ sample"):
        finetune(digits[0], (x, y[:64]), progress=False,
                 **dict(SMALL, epochs=2, iters_per_epoch=2, use_lowpass=False, augment=False))


def test_a_learned_scale_that_leaves_the_positive_range_is_named():
    from synq.finetune import _check_finite
    student = quantize_model(_digits_cnn(), 4, 4, learnable="lsq")
    totals = {"correct": 0, "seen": 8, "nonfinite": 0, "sums": {"loss": 1.0}}
    cfg = FinetuneConfig(epochs=2)
    _check_finite(totals, 1, cfg, False, student)  # fine as initialized
    name, p = next((n, p) for n, p in student.named_parameters() if n.endswith(".scale"))
    with torch.no_grad():
        p.view(-1)[0] = -0.5
    with pytest.raises(FloatingPointError, match=rf"{name} reached -0.5"):
        _check_finite(totals, 1, cfg, False, student)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_run_is_channels_last_and_returns_a_contiguous_student(digits, synthetic, monkeypatch,
                                                               device):
    import synq_kernels
    teacher = digits[0]
    layouts = []
    real = synq_kernels.fake_quant

    def spy(x, *a, **k):
        if x.dim() == 4 and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:
            layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        return real(x, *a, **k)
    monkeypatch.setattr(synq_kernels, "fake_quant", spy)
    res = finetune(teacher, synthetic, progress=False, device=device,
                   **dict(SMALL, epochs=2, iters_per_epoch=2))
    assert layouts and all(layouts)  # activations and conv weights ran channels-last
    assert all(p.is_contiguous() for p in res.student.parameters())
    assert all(p.is_contiguous() for p in teacher.parameters())  # the caller's model as it was


@pytest.mark.parametrize("switches", [
    dict(use_lowpass=False, use_cam=False, use_hard_soft_labels=False),  # baseline
    dict(use_lowpass=False, use_cam=True, use_hard_soft_labels=False),
    dict(use_lowpass=False, use_cam=False, use_hard_soft_labels=True),
    pytest.param(dict(use_lowpass=True, use_cam=False, use_hard_soft_labels=False),
                 marks=needs_lowpass),
])
def test_each_switch_runs(digits, synthetic, switches):
    teacher = digits[0]
    cfg = dict(SMALL, epochs=2, iters_per_epoch=2, **switches)
    res = finetune(teacher, synthetic, progress=False, **cfg)
    last = res.history[-1]
    assert ("cam" in last) == switches["use_cam"]
    assert ("easy" in last) == switches["use_hard_soft_labels"]
    assert torch.isfinite(torch.tensor(last["loss"]))


def test_hast_terms_and_real_data(digits):
    _, train, test = digits
    torch.manual_seed(0)
    teacher = resnet20(10, 1).eval()
    with torch.no_grad():  # give the BN layers non-trivial statistics
        teacher.train()
        teacher(train.tensors[0][:64])
        teacher.eval()
    res = finetune(teacher, train, epochs=2, calib_epochs=1, iters_per_epoch=1, batch_size=16,
                   use_lowpass=False, feature_attention=True, difficulty_promotion=True,
                   eval_data=(test.tensors[0][:50], test.tensors[1][:50]), progress=False)
    assert "fa" in res.history[-1] and "promoted" in res.history[-1]
    assert res.n == 50


def test_feature_attention_compares_block_outputs():
    """The HAST term's layers are the residual blocks (their outputs after the final ReLU,
    as "each residual block output" in METHOD.md), not the adds before it; the quantized
    student has the same names; MobileNetV2's blocks end at their add."""
    from synq.finetune import residual_add_layers, residual_block_layers
    from synq.losses import ActivationCapture
    from synq.models import mobilenet_v2
    from synq.quant import quantize_model
    model = resnet20(10, 1).eval()
    blocks = residual_block_layers(model)
    assert blocks == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)], blocks
    assert [f"{n}.add" for n in blocks] == residual_add_layers(model)
    x = torch.randn(2, 1, 28, 28)
    with ActivationCapture(model, blocks) as cap, ActivationCapture(
            model, residual_add_layers(model)) as adds:
        model(x)
        for n in blocks:  # rectified, and the add's output before its ReLU
            assert torch.equal(cap.outputs[n], F.relu(adds.outputs[f"{n}.add"]))
            assert (adds.outputs[f"{n}.add"] < 0).any()
    student = quantize_model(model, 4, 4)
    assert set(blocks) <= dict(student.named_modules()).keys()
    mb = mobilenet_v2(10).eval()
    assert [f"{n}.add" for n in residual_block_layers(mb)] == residual_add_layers(mb)


def test_min_max_only_when_all_epochs_calibrate(digits, synthetic):
    teacher, _, test = digits
    res = finetune(teacher, synthetic, progress=False, **dict(SMALL, epochs=1, calib_epochs=1))
    q = quantize_model(teacher, 4, 4)
    assert res.history[0]["phase"] == "calibrate"
    for (n, a), (_, b) in zip(res.student.named_parameters(), q.named_parameters()):
        assert torch.equal(a, b), n  # nothing trained


def test_cam_layer_selection():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 3, 1), nn.Flatten()).eval()
    # the last conv works on a 1x1 map: the one before it counts, and its rectified output
    # (the ReLU after it) is the CAM layer
    assert find_cam_layer(model, torch.zeros(1, 1, 6, 6)) == "2"
    with pytest.raises(ValueError, match="1x1"):
        find_cam_layer(model, torch.zeros(1, 1, 1, 1))
    # no ReLU after the last conv: the last BatchNorm after it, else the conv itself
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten()).eval()
    assert find_cam_layer(plain, torch.zeros(1, 1, 6, 6)) == "1"
    bare = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()).eval()
    assert find_cam_layer(bare, torch.zeros(1, 1, 6, 6)) == "0"
    # a BatchNorm before the last conv (DenseNet's norm1 / norm2) does not count
    pre = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3), nn.Flatten()).eval()
    assert find_cam_layer(pre, torch.zeros(1, 1, 6, 6)) == "1"
    # the project's models: the last block's output
    assert find_cam_layer(resnet20(10, 1).eval(), torch.zeros(1, 1, 28, 28)) == "layer3.2.relu2"


@pytest.mark.parametrize("kwargs, match", [
    (dict(wbits=9), "wbits"),
    (dict(abits=1), "abits"),
    (dict(tau=0.0), "tau"),
    (dict(tau=1.2), "tau"),
    (dict(cam_layer="no.such.layer"), "no.such.layer"),
    (dict(calib_epochs=5, epochs=3), "calib_epochs"),
    (dict(learnable="lsq++"), "learnable"),
])
def test_bad_configuration(digits, synthetic, kwargs, match):
    teacher = digits[0]
    with pytest.raises(ValueError, match=match):
        finetune(teacher, synthetic, progress=False, **dict(SMALL, **kwargs))


def test_bad_training_data_is_named_before_any_work(digits):
    teacher = digits[0]
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    bad = [((torch.randn(8, 3, 8, 8), y), r"has 3 channel\(s\), but the model's first "
                                          r"convolution takes 1"),
           ((x, torch.full((8,), 10)), "class indices below 10"),
           ((x, torch.full((8,), -1)), "class indices >= 0"),
           ((x, torch.full((8,), 0.5)), "must be class indices \\(integers\\)"),
           ((x, torch.zeros(8, dtype=torch.bool)), "must be class indices \\(integers\\)")]
    for data, match in bad:
        with pytest.raises(ValueError, match=match):
            finetune(teacher, data, progress=False, **SMALL)
    # integer-valued float labels are class indices
    finetune(teacher, (x, y.float()), progress=False, **dict(SMALL, epochs=1))
    with pytest.raises(ValueError, match=r"test set: the image shape 3,8,8"):
        evaluate(teacher, (torch.randn(4, 3, 8, 8), y[:4]))


def test_evaluate_topk_and_empty(digits):
    teacher, _, test = digits
    res = evaluate(teacher, (test.tensors[0][:20], test.tensors[1][:20]))
    assert res["n"] == 20 and 0 <= res["top1"] <= res["top5"] <= 100
    two_class = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    res = evaluate(two_class, (torch.zeros(3, 1, 8, 8), torch.tensor([0, 1, 1])))
    assert res["top5"] == 100.0  # top-k with k = 2 classes
    with pytest.raises(ValueError, match="empty"):
        evaluate(teacher, (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)))


def test_evaluate_runs_a_channels_last_copy_on_cpu(digits, monkeypatch):
    """On a CPU evaluate runs a channels-last copy of a conv model: the same accuracy, the
    caller's model untouched (layout and mode), and a model that cannot be copied runs as is."""
    import synq.evaluate as E
    teacher, _, test = digits
    teacher.train()
    seen = []  # per forward: whether the model that ran has channels-last conv weights

    def record(m, args):
        seen.append(any(p.dim() == 4 and p.shape[1] > 1 and not p.is_contiguous()
                        and p.is_contiguous(memory_format=torch.channels_last)
                        for p in m.parameters()))
    hook = teacher.register_forward_pre_hook(record)  # deep-copied with the model
    res = {}
    for flag in (False, True):
        monkeypatch.setattr(E, "CPU_CHANNELS_LAST", flag)
        seen.clear()
        res[flag] = evaluate(teacher, test)
        assert seen and all(v == flag for v in seen)
    hook.remove()
    assert res[True] == res[False]
    assert teacher.training and all(p.is_contiguous() for p in teacher.parameters())

    class NoCopy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = teacher

        def forward(self, x):
            return self.net(x)

        def __deepcopy__(self, memo):
            raise TypeError("not copyable")
    assert evaluate(NoCopy(), test) == res[False]


def test_calibrated_min_max_accuracy_on_digits(digits):
    teacher, train, test = digits
    q = quantize_model(teacher, 4, 4)
    calibrate(q, [train.tensors[0][:256]])
    assert evaluate(q, test)["top1"] > 80


@needs_lowpass
def test_default_d0_scales_with_the_image(digits, synthetic, monkeypatch):
    """d0=None (FinetuneConfig's default) filters with SynQ's 80 at 224 px scaled to the
    images' smaller side; 80 itself would barely touch an 8x8 image. An explicit d0 is kept."""
    assert filters.scaled_d0((5, 3, 224, 224)) == 80.0
    assert filters.scaled_d0((5, 1, 28, 32)) == 10.0 and FinetuneConfig().d0 is None
    import synq.finetune as ft
    seen, real = [], filters.lowpass
    monkeypatch.setattr(ft.filters, "lowpass",
                        lambda x, d0, *a, **k: (seen.append(d0), real(x, d0, *a, **k))[1])
    small = {**SMALL, "epochs": 1, "iters_per_epoch": 1}
    finetune(digits[0], synthetic, **{**small, "d0": None}, progress=False)
    assert seen and set(seen) == {80.0 * 8 / 224}, seen
    seen.clear()
    finetune(digits[0], synthetic, **small, progress=False)
    assert set(seen) == {3.0}, seen

"""synq.synth: BN-statistics synthesis (loss moves the statistics, seeding, resume, format)."""
import pytest
import torch
from torch import nn

from synq.losses import BNStats, bns_loss
from synq.synth import SynthConfig, augment_batch, load_synthetic, seeded_generator, synthesize


pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_model():
    """A small BN CNN whose running statistics are far from those of N(0, 1) noise."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.uniform_(0.2, 2.0)
    return model.eval()


def _bns(model, images):
    with BNStats(model) as stats, torch.no_grad():
        model(images)
        return float(bns_loss(stats.inputs, stats.layers))


FAST = dict(num_images=24, batch_size=12, steps=40)


def test_synthesis_moves_bn_statistics_to_running_ones(tmp_path):
    model = _bn_model()
    out = synthesize(model, tmp_path / "syn.pt", (1, 8, 8), progress=False, **FAST)
    images, labels = out["images"], out["labels"]
    assert images.shape == (24, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (24,) and labels.dtype == torch.int64 and labels.max() < 4
    assert out["meta"]["complete"] and out["meta"]["num_classes"] == 4
    noise = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    before, after = _bns(model, noise), _bns(model, images)
    assert after < 0.5 * before, (before, after)
    # the model is left as it was
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    # the file reads back as a dataset
    ds = load_synthetic(tmp_path / "syn.pt")
    assert torch.equal(ds.tensors[0], images) and torch.equal(ds.tensors[1], labels)


def test_batches_do_not_depend_on_earlier_ones(tmp_path):
    model = _bn_model()
    two = synthesize(model, tmp_path / "two.pt", (1, 8, 8), num_images=8, batch_size=4,
                     steps=3, progress=False)
    one = synthesize(model, tmp_path / "one.pt", (1, 8, 8), num_images=4, batch_size=4,
                     steps=3, progress=False)
    assert torch.equal(two["images"][:4], one["images"])
    assert torch.equal(two["labels"][:4], one["labels"])
    assert not torch.equal(two["images"][:4], two["images"][4:])
    other_seed = synthesize(model, tmp_path / "s1.pt", (1, 8, 8), num_images=4, batch_size=4,
                            steps=3, seed=1, progress=False)
    assert not torch.equal(other_seed["images"], one["images"])


def test_resume_after_interruption_gives_the_same_file(tmp_path):
    model = _bn_model()
    cfg = SynthConfig(num_images=10, batch_size=4, steps=5, augment=True)  # 3 batches
    full = synthesize(model, tmp_path / "full.pt", (1, 8, 8), config=cfg, progress=False)

    def interrupt(b):
        if b == 1:
            raise KeyboardInterrupt

    path = tmp_path / "cut.pt"
    with pytest.raises(KeyboardInterrupt):
        synthesize(model, path, (1, 8, 8), config=cfg, progress=False, on_batch_end=interrupt)
    partial = torch.load(path, weights_only=False)
    assert partial["meta"]["batches_done"] == 2 and not partial["meta"]["complete"]
    assert partial["images"].shape[0] == 8
    with pytest.raises(ValueError, match="incomplete"):
        load_synthetic(path)
    resumed = synthesize(model, path, (1, 8, 8), config=cfg, progress=False)
    assert resumed["images"].shape[0] == 10
    assert torch.equal(resumed["images"], full["images"])
    assert torch.equal(resumed["labels"], full["labels"])
    # a different configuration or model must not silently extend the file
    with pytest.raises(ValueError, match="config"):
        synthesize(model, path, (1, 8, 8), config=cfg, steps=6, progress=False)
    other = _bn_model()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="model"):
        synthesize(other, path, (1, 8, 8), config=cfg, progress=False)


def test_class_centres_option(tmp_path):
    model = _bn_model()
    out = synthesize(model, tmp_path / "c.pt", (1, 8, 8), num_images=8, batch_size=8, steps=5,
                     lbns=True, centre_steps=5, progress=False)
    assert out["centres"]["images"].shape == (4, 1, 8, 8)
    assert len(out["centres"]["means"]) == 1  # the later half of 2 BN layers
    assert "lbns" in out["meta"]["batch_losses"][0]


def test_bad_configuration(tmp_path):
    no_bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    no_bn(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="BatchNorm"):
        synthesize(no_bn, tmp_path / "x.pt", (1, 8, 8), progress=False, **FAST)
    with pytest.raises(ValueError, match="steps"):
        synthesize(_bn_model(), tmp_path / "x.pt", (1, 8, 8), steps=0, progress=False)
    with pytest.raises(ValueError, match="image_shape"):
        synthesize(_bn_model(), tmp_path / "x.pt", (8, 8), progress=False, **FAST)
    with pytest.raises(ValueError, match=r"has 3 channel\(s\), but the model's first "
                                         r"convolution takes 1"):
        synthesize(_bn_model(), tmp_path / "x.pt", (3, 8, 8), progress=False, **FAST)
    assert not (tmp_path / "x.pt").exists()


def test_augment_batch_is_seeded_and_differentiable():
    x = torch.randn(3, 2, 6, 6, requires_grad=True)
    a = augment_batch(x, seeded_generator(0, 1))
    b = augment_batch(x, seeded_generator(0, 1))
    assert torch.equal(a, b) and a.shape == x.shape
    a.sum().backward()
    assert x.grad is not None
    # crop_scale (1, 1) without flip is not the identity: the aspect ratio is still drawn (3/4
    # to 4/3), so each crop spans the whole image along one axis and at least sqrt(3/4) of it
    # along the other (stretched back to full size), inside the image, unflipped
    from synq.synth import apply_augmentation, augmentation_params
    theta = augmentation_params(16, seeded_generator(0), crop_scale=(1.0, 1.0), flip=False)
    w, h, cx, cy = theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2]
    assert torch.equal(torch.maximum(w, h), torch.ones(16))
    ratio = torch.minimum(w, h) ** 2  # area 1: w * h = ratio clamped to the image
    assert bool(((ratio >= 0.75 - 1e-6) & (ratio <= 1)).all()) and bool((ratio < 1).any())
    assert bool((cx.abs() <= 1 - w + 1e-7).all()) and bool((cy.abs() <= 1 - h + 1e-7).all())
    assert not theta[:, 0, 1].any() and not theta[:, 1, 0].any()  # no rotation, no flip
    # augment_batch is apply_augmentation of those maps
    big = torch.randn(16, 2, 6, 6)
    out = augment_batch(big, seeded_generator(0), crop_scale=(1.0, 1.0), flip=False)
    assert torch.equal(out, apply_augmentation(big, theta))
    assert not torch.allclose(out, big)
    # along the axis a crop spans, nothing moves: an image that varies only along that axis
    # comes back unchanged (and some crops span each axis)
    full_h, full_w = (h == 1) & (cy == 0), (w == 1) & (cx == 0)
    assert full_h.any() and full_w.any()
    rows = torch.randn(16, 2, 6, 1).expand(16, 2, 6, 6)
    cols = torch.randn(16, 2, 1, 6).expand(16, 2, 6, 6)
    torch.testing.assert_close(apply_augmentation(rows, theta)[full_h], rows[full_h])
    torch.testing.assert_close(apply_augmentation(cols, theta)[full_w], cols[full_w])
    # the identity map itself gives the image back
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(16, 2, 3)
    torch.testing.assert_close(apply_augmentation(big, eye), big)


def test_cpu_channels_last_copy_computes_the_same_losses(tmp_path, monkeypatch):
    """Synthesis on a CPU runs a channels-last copy of the model: the caller's model keeps its
    layout, and the first step's losses (before any update) equal those of the model as is."""
    import synq.synth as S
    import synq_kernels
    model = _bn_model()
    losses, layouts = {}, []
    real, real_bn = synq_kernels.channel_stats, synq_kernels.batch_norm_stats

    def record(x):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last)
                       and not x.is_contiguous())

    def spy(x, backend=None):
        record(x)
        return real(x, backend)

    def spy_bn(x, *args, **kwargs):  # BNStats's fused layers (a CPU build)
        record(x)
        return real_bn(x, *args, **kwargs)
    monkeypatch.setattr(synq_kernels, "channel_stats", spy)
    monkeypatch.setattr(synq_kernels, "batch_norm_stats", spy_bn)
    for cl in (False, True):
        monkeypatch.setattr(S, "CPU_CHANNELS_LAST", cl)
        layouts.clear()
        out = synthesize(model, tmp_path / f"cl{cl}.pt", (1, 8, 8), num_images=12,
                         batch_size=12, steps=1, progress=False)
        losses[cl] = out["meta"]["batch_losses"][0]
        assert layouts and all(f == cl for f in layouts)  # the BN inputs' layout
    assert losses[True].keys() == losses[False].keys()
    for k in losses[True]:
        assert losses[True][k] == pytest.approx(losses[False][k], rel=1e-5), k
    assert all(p.is_contiguous() for p in model.parameters())


def test_keep_best_stores_the_lowest_loss_iterate(tmp_path):
    """keep_best (the default) saves each batch's iterate of lowest loss: its recomputed
    loss is the one reported, and never above the last iterate's of the same trajectory."""
    from synq.losses import focal_ce
    model = _bn_model()
    got = {}
    for kb in (False, True):
        out = synthesize(model, tmp_path / f"kb{kb}.pt", (1, 8, 8), num_images=12,
                         batch_size=12, steps=30, lr=2.0, keep_best=kb, progress=False)
        got[kb] = out
    reported = {kb: o["meta"]["batch_losses"][0] for kb, o in got.items()}
    total = {kb: r["bns"] + 0.1 * r["ce"] for kb, r in reported.items()}
    assert total[True] <= total[False]
    with BNStats(model) as stats, torch.no_grad():
        logits = model(got[True]["images"])
        bns = float(bns_loss(stats.inputs, stats.layers))
        ce = float(focal_ce(logits, got[True]["labels"], 0.5))
    assert bns == pytest.approx(reported[True]["bns"], rel=1e-4)
    assert ce == pytest.approx(reported[True]["ce"], rel=1e-3, abs=1e-6)


def test_to_device_async_keeps_values():
    from synq.synth import to_device_async
    t = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(to_device_async(t, "cpu"), t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_device_async_cuda_does_not_synchronize():
    """A host tensor reaches the GPU without the host waiting (CUDA's sync debug mode raises
    on a synchronizing call), with its values."""
    from synq.synth import to_device_async
    t = torch.randn(64, 2, 3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d = to_device_async(t, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert d.is_cuda and torch.equal(d.cpu(), t)


def test_load_synthetic_names_what_it_expected(tmp_path):
    """A file that is not a saved synthetic set gets an error saying so, not the unpickler's."""
    bad = tmp_path / "garbage.pt"
    bad.write_text("garbage\n")
    with pytest.raises(ValueError, match="not a synthetic-data file written by `synq synthesize`"):
        load_synthetic(bad)
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a synthetic-data file"):
        load_synthetic(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_synthetic(tmp_path / "missing.pt")

import functools

import pytest
import torch
from torch import nn

from synq.models import Add, get_model, resnet20

CASES = [
    ("resnet20", dict(), (2, 3, 32, 32), 10),
    ("resnet20", dict(in_channels=1), (2, 1, 28, 28), 10),
    ("resnet18", dict(num_classes=7), (1, 3, 32, 32), 7),
    ("resnet50", dict(num_classes=5), (1, 3, 32, 32), 5),
    ("mobilenet_v2", dict(num_classes=4, width_mult=0.5), (1, 3, 32, 32), 4),
]


@functools.lru_cache(maxsize=None)
def default_model(name):
    return get_model(name)


@pytest.mark.parametrize("name,kwargs,shape,classes", CASES)
def test_forward_shape(name, kwargs, shape, classes):
    torch.manual_seed(0)
    model = get_model(name, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (shape[0], classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,n_adds", [
    ("resnet20", 9), ("resnet18", 8), ("resnet50", 16), ("mobilenet_v2", 10)])
def test_residual_adds_are_modules(name, n_adds):
    model = default_model(name)
    assert sum(isinstance(m, Add) for m in model.modules()) == n_adds


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "resnet50", "mobilenet_v2"])
def test_activations_are_distinct_non_inplace_modules(name):
    model = default_model(name)
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    assert acts and not any(m.inplace for m in acts)
    # Each activation module is used at one place only, so a quantizer can follow it.
    assert len({id(m) for m in acts}) == len(acts)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(id(m))) for m in acts]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(seen) == len(acts) == len(set(seen))


def test_mobilenet_uses_relu6():
    model = default_model("mobilenet_v2")
    assert not any(type(m) is nn.ReLU for m in model.modules())
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())


def test_resnet20_parameter_count():
    # 0.27 M parameters for 3 input channels with option-B projections.
    n = sum(p.numel() for p in resnet20().parameters())
    assert 265_000 < n < 280_000


def test_torchvision_parameter_names():
    keys = set(default_model("resnet18").state_dict())
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "fc.bias"} <= keys
    keys = set(default_model("mobilenet_v2").state_dict())
    assert {"features.0.0.weight", "features.1.conv.0.0.weight",
            "features.18.1.running_var", "classifier.1.weight"} <= keys


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError, match="resnet20") as e:
        get_model("vgg16")
    assert "vgg16" in str(e.value) and "mobilenet_v2" in str(e.value)

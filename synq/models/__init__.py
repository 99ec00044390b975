"""Model definitions (no torchvision dependency) and a name registry."""

from .common import Add
from .mobilenetv2 import MobileNetV2, mobilenet_v2
from .resnet_cifar import ResNetCifar, resnet20
from .resnet_imagenet import ResNet, resnet18, resnet50

MODELS = {
    "resnet20": resnet20,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
}


def get_model(name, **kwargs):
    """Build a model by name, e.g. get_model("resnet20", in_channels=1)."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model name {name!r}; known names: {', '.join(sorted(MODELS))}"
        ) from None
    return builder(**kwargs)


__all__ = ["Add", "MODELS", "MobileNetV2", "ResNet", "ResNetCifar", "get_model",
           "mobilenet_v2", "resnet18", "resnet20", "resnet50"]

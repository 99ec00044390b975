"""Bundled weights: the default teacher, a ResNet-20 trained on Fashion-MNIST."""

import json
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DEFAULT_TEACHER = "resnet20_fmnist"


def load_default_teacher(name=DEFAULT_TEACHER, map_location="cpu"):
    """Return (model in eval mode, metadata dict) of a bundled teacher; reads local files only."""
    from safetensors.torch import load_file

    from synq.models import get_model

    weights, meta_path = ASSETS_DIR / f"{name}.safetensors", ASSETS_DIR / f"{name}.json"
    for path in (weights, meta_path):
        if not path.is_file():
            raise FileNotFoundError(f"teacher file {path} is missing; train it with "
                                    f"`python scripts/train_teacher.py` from the repository root")
    meta = json.loads(meta_path.read_text())
    model = get_model(meta["architecture"], **meta["kwargs"])
    model.load_state_dict(load_file(str(weights), device=str(map_location)), strict=True)
    return model.eval(), meta

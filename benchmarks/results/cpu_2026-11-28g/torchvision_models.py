"""cpu_2026-11-28f/torchvision_models.py (see its docstring) with MobileNetV3 large added to
its list of models, which this session's Hardswish / SiLU support made exportable:
    python torchvision_models.py TORCHVISION_DIR [MODEL ...]"""
import importlib.util
import os
import sys

_spec = importlib.util.spec_from_file_location(
    "torchvision_models_28f", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                           "cpu_2026-11-28f", "torchvision_models.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)
build = _base.build
_base.NAMES.insert(_base.NAMES.index("mobilenet_v3_small") + 1, "mobilenet_v3_large")

if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])  # torchvision
    _base.main()

"""The cpu_2026-11-28g run (the cpu_2026-11-28f script with MobileNetV3 large added) again,
after DenseNet's float BatchNorms were made exportable: same models, same steps.
    python torchvision_models.py TORCHVISION_DIR [MODEL ...]"""
import runpy
import sys

sys.argv[0] = "benchmarks/results/cpu_2026-11-28g/torchvision_models.py"
runpy.run_path(sys.argv[0], run_name="__main__")

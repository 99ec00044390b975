"""Build of synq and its compiled kernels `synq_kernels._C`.

Environment flags:
  SYNQ_BUILD_EXT=0     skip the compiled extension (Python-only install: reference and
                       Triton backends only).
  SYNQ_BUILD_CUDA=1/0  force the CUDA sources on or off. Default: on when a CUDA toolkit
                       (nvcc under CUDA_HOME) and a CUDA build of torch are both present;
                       a visible GPU is not needed.
  TORCH_CUDA_ARCH_LIST CUDA targets, default "8.0;9.0+PTX" (sm_80 and sm_90 machine code,
                       and sm_90 PTX that newer GPUs compile when loading).
  MAX_JOBS             parallel compile jobs (ninja).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    sys.exit(f"setup.py: {name}={value!r} is not a boolean (use 1 or 0)")


def _have_cxx():
    return any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++"))


def _find_cuda_home():
    """torch guesses CUDA_HOME from the folder above `nvcc` on PATH, which is wrong when that
    nvcc is a wrapper script (as on this project's CI machine); prefer a folder that really
    holds the toolkit (bin/nvcc and libcudart)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    cands = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in cands:
        has_lib = any(os.path.exists(os.path.join(home, d, "libcudart.so"))
                      for d in ("lib64", "lib", "targets/x86_64-linux/lib"))
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and has_lib:
            os.environ["CUDA_HOME"] = home
            return


def _extensions():
    if _flag("SYNQ_BUILD_EXT") is False:
        print("synq: SYNQ_BUILD_EXT=0, building without synq_kernels._C")
        return [], {}
    if not _have_cxx():
        print("synq: no C++ compiler found, building without synq_kernels._C "
              "(reference and Triton backends only)")
        return [], {}
    _find_cuda_home()
    import torch
    from torch.utils import cpp_extension as ce

    want_cuda = _flag("SYNQ_BUILD_CUDA")
    can_cuda = ce.CUDA_HOME is not None and torch.version.cuda is not None
    if want_cuda and not can_cuda:
        sys.exit("synq: SYNQ_BUILD_CUDA=1 but "
                 + ("torch is a CPU build" if torch.version.cuda is None
                    else "no CUDA toolkit was found (set CUDA_HOME)"))
    use_cuda = can_cuda if want_cuda is None else want_cuda
    print(f"synq: building synq_kernels._C with CUDA {'on' if use_cuda else 'off'}")

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # The C++ standard is left to torch (C++20 for torch 2.14, C++17 before).
    # -O3 and no -g: debug info doubles compile time and is not needed in a release build.
    # OpenMP drives at::parallel_for (torch's own libgomp is already loaded at run time).
    # -fno-math-errno / -fno-trapping-math let GCC if-convert and vectorize the rounding and
    # clamping selects (no code relies on FP exceptions); -ffp-contract=off keeps the rounding of
    # x / scale and (q - z) * scale identical to the reference.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        # +PTX: sm_90 PTX as well, which the driver compiles for newer GPUs (sm_100, sm_120)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["cxx"] = cxx + ["-DSYNQ_WITH_CUDA"]
        extra["nvcc"] = ["-O3", "-DSYNQ_WITH_CUDA", "--expt-relaxed-constexpr",
                         "-fmad=false"]
        # pip's CUDA 13 wheels keep cusparse.h and friends here; torch's headers include them.
        for p in sys.path:
            inc = os.path.join(p, "nvidia", "cu13", "include")
            if os.path.isdir(inc):
                include_dirs.append(inc)
                break
        Ext = ce.CUDAExtension
    else:
        Ext = ce.CppExtension
    ext = Ext(
        "synq_kernels._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    class BuildExt(ce.BuildExtension):
        def build_extensions(self):
            # Python's own CFLAGS carry -g; debug info doubles the C++ compile time.
            for attr in ("compiler_so", "compiler", "compiler_cxx", "linker_so"):
                cmd = getattr(self.compiler, attr, None)
                if isinstance(cmd, list):
                    setattr(self.compiler, attr, [a for a in cmd if a != "-g"])
            super().build_extensions()

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=bool(shutil.which("ninja")))}


ext_modules, cmdclass = _extensions()

setup(
    name="synq",
    version="0.1.0",
    description="Zero-shot quantization of CNNs with SynQ, on fused CPU, CUDA and Triton kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["synq", "synq.*", "synq_kernels", "synq_kernels.*", "benchmarks"]),
    package_data={"synq": ["assets/*.safetensors", "assets/*.json"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "safetensors",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={"test": ["pytest", "hypothesis", "scikit-learn"],
                    "bench": ["matplotlib"]},  # the latency plot of bench_inference
    entry_points={"console_scripts": ["synq=synq._entry:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)

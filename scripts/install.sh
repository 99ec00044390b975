#!/usr/bin/env bash
# Installs synq into a virtual environment (.venv by default) on a fresh x86_64 Linux
# machine: PyTorch, the package with its compiled kernels, and, with --test, the test
# extras. Idempotent: a second run only rebuilds what changed.
#
#   SYNQ_VENV=path        where the environment lives (default: .venv in the repository)
#   SYNQ_TORCH=spec       the torch requirement (default: torch==2.14.1, a CUDA 13.0 build
#                         against which the CUDA kernels compile; no GPU is needed)
#   SYNQ_BUILD_CUDA=0/1   see setup.py (default: CUDA kernels when nvcc is present)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SYNQ_VENV:-.venv}
TORCH_SPEC=${SYNQ_TORCH:-torch==2.14.1}
EXTRAS=""
[[ "${1:-}" == "--test" ]] && EXTRAS="[test]"

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel ninja
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "$TORCH_SPEC"
"$PY" -m pip install -q numpy tqdm safetensors
[[ -n "$EXTRAS" ]] && "$PY" -m pip install -q pytest hypothesis scikit-learn

# nvcc may live outside PATH on a fresh machine.
if ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda/bin /usr/local/cuda-13.0/bin; do
    [[ -x "$d/nvcc" ]] && export PATH="$d:$PATH" && break
  done
fi
# Fashion-MNIST for the bundled model's test set (Debian package; skipped where apt is absent).
if [[ ! -d /usr/share/datasets/fashion-mnist ]] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null || \
    echo "warning: could not install dataset-fashion-mnist; evaluation on Fashion-MNIST needs it"
fi

# Rebuild only when the package is not installed here or a source is newer than the built
# library (a full build with the CUDA kernels takes minutes on 2 cores).
SO=$(ls synq_kernels/_C*.so 2>/dev/null | head -1 || true)
if [[ -n "$SO" && -x "$VENV/bin/synq" ]] && (cd / && "$PY" -c "import synq, synq_kernels._C") 2>/dev/null && \
   [[ -z "$(find csrc setup.py -newer "$SO" -print -quit)" ]]; then
  echo "synq is installed and its kernels are up to date ($SO)"
else
  MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation --no-deps -e ".$EXTRAS"
fi
"$PY" -c "import synq_kernels, synq_kernels._ext as e; print('synq installed; compiled kernels:', 'none (' + e.load_error() + ')' if e.load_error() else ('cpu+cuda' if e.has_cuda_kernels() else 'cpu'))"

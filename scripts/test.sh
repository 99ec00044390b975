#!/usr/bin/env bash
# Installs synq with its test extras (scripts/install.sh) and runs the test suite. Triton
# kernels run under the Triton interpreter when no GPU is present; CUDA tests skip then.
# When the CUDA kernels were built, also checks that the library holds sm_90 machine code.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
PY=${SYNQ_VENV:-.venv}/bin/python
if "$PY" -c "import sys, synq_kernels._ext as e; sys.exit(0 if e.has_cuda_kernels() else 1)"; then
  "$PY" -m pip install -q nvidia-cuda-cuobjdump
  bash scripts/check_sm90.sh "$PY"
fi
exec "$PY" -m pytest -q "$@"

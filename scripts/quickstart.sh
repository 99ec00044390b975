#!/usr/bin/env bash
# The main job on a fresh machine: install synq into .venv (scripts/install.sh), then quantize
# the bundled Fashion-MNIST ResNet-20 to W4A4 with SynQ and print FP vs quantized top-1.
# Extra arguments go to `synq quantize` (see `synq quantize --help`), e.g. --wbits 3 --abits 3.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV=${SYNQ_VENV:-.venv}
OUT=${SYNQ_OUT:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
exec "$VENV/bin/synq" quantize --out "$OUT" "$@"

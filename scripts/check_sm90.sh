#!/usr/bin/env bash
# Fails unless the built synq_kernels._C holds sm_90 machine code (cuobjdump from the PyPI
# package nvidia-cuda-cuobjdump, or the CUDA toolkit's).
set -euo pipefail
PY=${1:-python}
SO=$("$PY" -c "import synq_kernels._C as c; print(c.__file__)")
CUOBJDUMP=$(command -v cuobjdump || true)
if [[ -z "$CUOBJDUMP" ]]; then
  CUOBJDUMP=$("$PY" - <<'P'
import glob, os, site
for p in site.getsitepackages():
    for f in glob.glob(os.path.join(p, "nvidia", "**", "bin", "cuobjdump"), recursive=True):
        print(f); raise SystemExit
P
)
fi
[[ -x "$CUOBJDUMP" ]] || { echo "cuobjdump not found"; exit 1; }
ELF=$("$CUOBJDUMP" --list-elf "$SO")
echo "$ELF" | sed 's/^/  /'
echo "$ELF" | grep -q "sm_90" || { echo "FAIL: $SO holds no sm_90 machine code"; exit 1; }
echo "ok: $SO holds sm_90 machine code"

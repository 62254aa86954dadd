#!/usr/bin/env bash
# Compile check of the CUDA kernel on a machine without a GPU (see docs/cuda.md).
#
# Builds mmdet_deform._C with FORCE_CUDA=1 against a CUDA build of torch in a
# separate venv (never the project's .venv), into a build directory outside
# the source tree (the in-tree CPU build is left alone), then:
#   * fails on any compiler warning from our own sources;
#   * lists the SASS architectures in the library (cuobjdump, when present);
#   * imports the library with the CUDA torch and checks that the CUDA kernels
#     of both ops are registered (no GPU needed to register them).
#
# Usage: tools/build_cuda_check.sh [BUILD_DIR]
# Environment:
#   CUDA_BUILD_VENV       venv to use/create (default ~/.cache/mmdet_deform/cuda-build-venv)
#   CUDA_TORCH_SPEC       torch to install there (default torch==2.14.1, a CUDA 13.0 build)
#   CUDA_HOME             CUDA toolkit (default /usr/local/cuda)
#   TORCH_CUDA_ARCH_LIST  architectures (default "8.0;9.0")
#   MAX_JOBS              parallel compile jobs (default 2)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${1:-/tmp/mmdet_deform_cudabuild}"
VENV="${CUDA_BUILD_VENV:-$HOME/.cache/mmdet_deform/cuda-build-venv}"
TORCH_SPEC="${CUDA_TORCH_SPEC:-torch==2.14.1}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export FORCE_CUDA=1
export PATH="$CUDA_HOME/bin:$PATH"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "== creating $VENV with $TORCH_SPEC"
  python3.11 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" setuptools wheel numpy
fi
PY="$VENV/bin/python"
"$PY" -c 'import torch; assert torch.version.cuda, "torch in the build venv has no CUDA"; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
nvcc --version | tail -n 2

rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR"
LOG="$BUILD_DIR/build.log"
echo "== building into $BUILD_DIR (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, log: $LOG)"
start=$(date +%s)
(cd "$ROOT" && "$PY" setup.py build_ext -b "$BUILD_DIR/lib" -t "$BUILD_DIR/tmp") >"$LOG" 2>&1 || {
  tail -n 60 "$LOG"
  echo "BUILD FAILED"
  exit 1
}
echo "   built in $(($(date +%s) - start)) s"

# Warnings from our sources, and ptxas warnings (setup.py passes
# --warn-on-spills); torch's own headers are not ours to fix.
if grep -E 'mmdet_deform/ops/csrc/[^ ]*: *warning|ptxas warning' "$LOG" >"$BUILD_DIR/warnings.txt"; then
  cat "$BUILD_DIR/warnings.txt"
  echo "FAILED: compiler warnings in mmdet_deform/ops/csrc or register spills (full log: $LOG)"
  exit 1
fi
echo "   no compiler warnings from mmdet_deform/ops/csrc, no register spills" \
  "($(grep -c -i 'warning' "$LOG" || true) warning lines in the whole log)"

SO="$(ls "$BUILD_DIR"/lib/mmdet_deform/_C*.so)"
if command -v cuobjdump >/dev/null 2>&1; then
  echo "== SASS in $(basename "$SO"):"
  cuobjdump --list-elf "$SO" | sed 's/^/   /'
fi

echo "== registration check"
(cd "$BUILD_DIR/lib" && "$PY" - <<'EOF'
import importlib.util
import sys

import torch

spec = importlib.util.spec_from_file_location(
    'mmdet_deform._C', __import__('glob').glob('mmdet_deform/_C*.so')[0]
)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
for op in ('mmdet_deform::ms_deform_attn', 'mmdet_deform::_ms_deform_attn_backward'):
    for key in ('CPU', 'CUDA'):
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
        print(f'   {op} {key}: {"registered" if ok else "MISSING"}')
        if not ok:
            sys.exit(1)
EOF
)
echo "OK: the CUDA kernel compiles and registers (it is NOT run here: no GPU)"

#!/usr/bin/env bash
# Build and check the CUDA kernel of multi-scale deformable attention on a
# machine with an NVIDIA GPU, nvcc and a CUDA build of torch (docs/cuda.md).
#
#   dev/cuda_check.sh [STEP ...]      default: env build test sanitize bench
#
# Steps, run in the order given (the first failing one stops the script):
#   env       python, torch, CUDA, GPU, nvcc and tool versions
#   build     FORCE_CUDA=1 in-place build of mmdet_deform._C for this GPU's
#             architecture; fails on a compiler warning from our sources or a
#             register spill, and unless the CUDA kernel is registered
#   test      pytest tests/test_ops tests/test_setup.py (the CUDA cases run
#             when a GPU is present)
#   sanitize  compute-sanitizer memcheck, initcheck and synccheck on
#             dev/msda_cuda_smoke.py (every kernel path, all dtypes)
#   bench     tools/analysis_tools/benchmark_msda.py --device cuda (mmcv's CUDA
#             kernel joins the table when mmcv with CUDA ops is installed)
#   ncu       Nsight Compute summary of our kernels at the encoder workload
#   compile   compile check for machines without a GPU: builds into
#             $LOG_DIR/compile (the in-tree build is left alone) for
#             TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), fails on warnings or
#             spills, and checks that both ops register a CUDA kernel
#
# Environment: PYTHON (an interpreter whose torch has CUDA; default python3),
# TORCH_CUDA_ARCH_LIST (default: the architecture of GPU 0), MAX_JOBS (compile
# jobs; default: number of cores), CUDA_HOME (default: torch's guess),
# LOG_DIR (build logs and reports; default build/cuda_check).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
LOG_DIR="${LOG_DIR:-$ROOT/build/cuda_check}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
STEPS=(env build test sanitize bench ncu compile)
usage="usage: dev/cuda_check.sh [env|build|test|sanitize|bench|ncu|compile ...]"

# Warnings from our own sources and ptxas warnings (setup.py passes
# --warn-on-spills); torch's headers are not ours to fix.
OWN_WARNINGS='mmdet_deform/ops/csrc/[^ ]*: *warning|ptxas warning'

check_build_log() {
  if grep -E "$OWN_WARNINGS" "$1"; then
    echo "FAILED: compiler warnings in mmdet_deform/ops/csrc or register spills (log: $1)"
    return 1
  fi
  echo "no compiler warnings from mmdet_deform/ops/csrc, no register spills"
}

gpu_arch() {
  "$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())'
}

step_env() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null \
    || echo "nvidia-smi: missing"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.is_available() and torch.cuda.get_device_name())'
  nvcc --version | tail -n 2 || true
  for tool in compute-sanitizer ncu ninja; do
    printf '%s: %s\n' "$tool" "$(command -v "$tool" || echo missing)"
  done
  "$PY" -c 'import mmcv.ops' 2>/dev/null && echo "mmcv.ops importable" \
    || echo "mmcv.ops not importable: the benchmark compares ours with the reference only"
}

step_build() {
  local arch="${TORCH_CUDA_ARCH_LIST:-$(gpu_arch)}"
  local log="$LOG_DIR/build.log"
  echo "building mmdet_deform._C in place, FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch (log: $log)"
  local start
  start=$(date +%s)
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" "$PY" setup.py build_ext --inplace >"$log" 2>&1 || {
    tail -n 80 "$log"
    echo "BUILD FAILED"
    return 1
  }
  echo "built in $(($(date +%s) - start)) s"
  check_build_log "$log"
  "$PY" -c 'from mmdet_deform.ops import has_cuda_kernel; assert has_cuda_kernel(), "no CUDA kernel registered"; print("CUDA kernel registered")'
}

step_test() {
  "$PY" -m pytest tests/test_ops tests/test_setup.py -q -ra -p no:cacheprovider \
    --junitxml="$LOG_DIR/pytest.xml"
}

step_sanitize() {
  local status=0 tool
  for tool in memcheck initcheck synccheck; do
    echo "== compute-sanitizer --tool $tool (log: $LOG_DIR/sanitizer_$tool.log)"
    compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 \
      "$PY" dev/msda_cuda_smoke.py >"$LOG_DIR/sanitizer_$tool.log" 2>&1 || status=1
    tail -n 4 "$LOG_DIR/sanitizer_$tool.log"
  done
  return $status
}

step_bench() {
  "$PY" tools/analysis_tools/benchmark_msda.py --device cuda
}

step_ncu() {
  ncu --kernel-name regex:'forward_kernel|backward_kernel' --launch-count 4 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    "$PY" - >"$LOG_DIR/ncu.txt" 2>&1 <<'EOF'
import torch

from mmdet_deform.ops import ms_deform_attn

# the encoder workload of tools/analysis_tools/benchmark_msda.py at bs 8
shapes = torch.tensor([[64, 84], [32, 42], [16, 21], [8, 11]], device='cuda')
areas = shapes.prod(1)
starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
nk = int(areas.sum())
for dtype in (torch.float32, torch.bfloat16):
    value = torch.rand(8, nk, 8, 32, device='cuda', dtype=dtype, requires_grad=True)
    loc = torch.rand(8, nk, 8, 4, 4, 2, device='cuda', dtype=dtype, requires_grad=True)
    attn = torch.rand(8, nk, 8, 4, 4, device='cuda', dtype=dtype, requires_grad=True)
    ms_deform_attn(value, shapes, starts, loc, attn).sum().backward()
torch.cuda.synchronize()
EOF
  grep -E '^  [a-z_:<>, 0-9A-Z]*kernel|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per' \
    "$LOG_DIR/ncu.txt" | head -60
}

step_compile() {
  local arch="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
  local dir="$LOG_DIR/compile"
  "$PY" -c 'import torch; assert torch.version.cuda, "PYTHON'"'"'s torch has no CUDA"; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
  nvcc --version | tail -n 2
  rm -rf "$dir"
  mkdir -p "$dir"
  echo "building into $dir, FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch (log: $dir/build.log)"
  local start
  start=$(date +%s)
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" "$PY" setup.py build_ext -b "$dir/lib" -t "$dir/tmp" \
    >"$dir/build.log" 2>&1 || {
    tail -n 60 "$dir/build.log"
    echo "BUILD FAILED"
    return 1
  }
  echo "built in $(($(date +%s) - start)) s"
  check_build_log "$dir/build.log"
  local so
  so="$(ls "$dir"/lib/mmdet_deform/_C*.so)"
  if command -v cuobjdump >/dev/null 2>&1; then
    echo "SASS in $(basename "$so"):"
    cuobjdump --list-elf "$so" | sed 's/^/  /'
  fi
  # Loading the library registers its kernels; no GPU is needed for that.
  "$PY" - "$so" <<'EOF'
import sys

import torch

torch.ops.load_library(sys.argv[1])
missing = 0
for op in ('mmdet_deform::ms_deform_attn', 'mmdet_deform::_ms_deform_attn_backward'):
    for key in ('CPU', 'CUDA'):
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
        print(f'{op} {key}: {"registered" if ok else "MISSING"}')
        missing += not ok
sys.exit(1 if missing else 0)
EOF
  echo "OK: the CUDA kernel compiles and registers (compile check only: nothing ran on a GPU)"
}

requested=("$@")
if [[ ${#requested[@]} -eq 0 ]]; then
  requested=(env build test sanitize bench)
fi
for step in "${requested[@]}"; do
  if [[ ! " ${STEPS[*]} " =~ " $step " ]]; then
    echo "unknown step: $step" >&2
    echo "$usage" >&2
    exit 2
  fi
done
mkdir -p "$LOG_DIR"
for step in "${requested[@]}"; do
  echo "=== $step"
  "step_$step"
done

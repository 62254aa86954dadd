#!/usr/bin/env bash
# The steps of a GPU session (docs/cuda.md), run from the repository root on
# a machine with a GPU, nvcc and torch but possibly no network; one step per
# call, each well under 10 minutes. Logs go to $OUT (default build/gpu_out).
#
#   tools/gpu_session.sh env       unpack build/gpu_bundle (tools/prepare_gpu_bundle.sh),
#                                  print torch / CUDA / GPU / tool versions
#   tools/gpu_session.sh build     build mmdet_deform._C in place with FORCE_CUDA=1
#   tools/gpu_session.sh test      pytest tests/test_ops tests/test_setup.py
#   tools/gpu_session.sh sanitize  compute-sanitizer memcheck, initcheck, synccheck
#                                  on tools/analysis_tools/msda_cuda_smoke.py
#   tools/gpu_session.sh mmcv      build mmcv 2.1.0 from its sdist in build/mmcv
#                                  (MMCV_WITH_OPS=1 FORCE_CUDA=1; resumable: rerun if cut)
#   tools/gpu_session.sh bench     tools/analysis_tools/benchmark_msda.py --device cuda
#   tools/gpu_session.sh ncu       Nsight Compute summary of our kernels at the encoder workload
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: this
# GPU's), MAX_JOBS (default: nproc), OUT, GPU_BUNDLE (default build/gpu_bundle).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
BUNDLE="${GPU_BUNDLE:-$ROOT/build/gpu_bundle}"
SITE="$ROOT/build/gpu_site"
MMCV_ROOT="$ROOT/build/mmcv/mmcv-2.1.0"
OUT="${OUT:-$ROOT/build/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)"
  export TORCH_CUDA_ARCH_LIST
fi

step="${1:?usage: tools/gpu_session.sh env|build|test|sanitize|mmcv|bench|ncu}"
case "$step" in
  env)
    # Wheels are zip files: unpacking them onto PYTHONPATH needs no pip.
    mkdir -p "$SITE"
    for wheel in "$BUNDLE"/wheels/*.whl; do
      [[ -e "$wheel" ]] || continue
      "$PY" -m zipfile -e "$wheel" "$SITE"
    done
    mkdir -p "$SITE/bin"  # the wheels' scripts (ninja), executable again
    for script in "$SITE"/*.data/scripts/*; do
      [[ -e "$script" ]] || continue
      chmod +x "$script"
      ln -sf "$script" "$SITE/bin/"
    done
    {
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
      "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.is_available() and torch.cuda.get_device_name())' || true
      nvcc --version | tail -n 2 || true
      for tool in compute-sanitizer ncu ninja; do
        printf '%s: %s\n' "$tool" "$(command -v "$tool" || echo missing)"
      done
      "$PY" -c 'import pytest, setuptools, pkg_resources; print("pytest", pytest.__version__, "setuptools", setuptools.__version__)' || true
      "$PY" -c 'import mmcv.ops' 2>/dev/null && echo "mmcv.ops importable" \
        || echo "mmcv.ops not importable: benchmarks load mmcv's kernel via tools/analysis_tools/mmcv_msda_baseline.py"
      echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
    } 2>&1 | tee "$OUT/env.txt"
    ;;
  build)
    start=$(date +%s)
    FORCE_CUDA=1 "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || {
      tail -n 80 "$OUT/build.log"
      exit 1
    }
    echo "built in $(($(date +%s) - start)) s"
    grep -E 'mmdet_deform/ops/csrc/[^ ]*: *warning|ptxas warning' "$OUT/build.log" || echo "no warnings from our sources"
    "$PY" -c 'from mmdet_deform.ops import has_cuda_kernel; assert has_cuda_kernel(); print("CUDA kernel registered")'
    ;;
  test)
    "$PY" -m pytest tests/test_ops tests/test_setup.py -q -ra -p no:cacheprovider \
      --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"
    ;;
  sanitize)
    status=0
    for tool in memcheck initcheck synccheck; do
      echo "== compute-sanitizer --tool $tool"
      compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 \
        "$PY" tools/analysis_tools/msda_cuda_smoke.py >"$OUT/sanitizer_$tool.log" 2>&1 || status=1
      tail -n 4 "$OUT/sanitizer_$tool.log"
    done
    exit $status
    ;;
  mmcv)
    if [[ ! -d "$MMCV_ROOT" ]]; then
      mkdir -p "$(dirname "$MMCV_ROOT")"
      tar xzf "$BUNDLE/sdist/mmcv-2.1.0.tar.gz" -C "$(dirname "$MMCV_ROOT")"
    fi
    start=$(date +%s)
    (cd "$MMCV_ROOT" && MMCV_WITH_OPS=1 FORCE_CUDA=1 "$PY" setup.py build_ext --inplace) \
      >"$OUT/mmcv_build.log" 2>&1 || {
      tail -n 60 "$OUT/mmcv_build.log"
      echo "mmcv build failed or was cut: rerun to resume, or use the single-file"
      echo "fallback of tools/analysis_tools/mmcv_msda_baseline.py"
      exit 1
    }
    echo "mmcv built in $(($(date +%s) - start)) s: $(ls "$MMCV_ROOT"/mmcv/_ext*.so)"
    ;;
  bench)
    # mmcv's kernel: tools/analysis_tools/mmcv_msda_baseline.py takes MMCV_ROOT
    export MMCV_ROOT
    "$PY" tools/analysis_tools/benchmark_msda.py --device cuda 2>&1 | tee "$OUT/bench.txt"
    ;;
  ncu)
    ncu --kernel-name regex:'forward_kernel|backward_kernel' --launch-count 4 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      "$PY" - >"$OUT/ncu.txt" 2>&1 <<'EOF'
import torch

from mmdet_deform.ops import ms_deform_attn

# encoder workload of docs/benchmarks.md at bs 8: 4 levels of a 512x672 image
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
    grep -E '^  [a-z_:<>, 0-9A-Z]*kernel|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per' "$OUT/ncu.txt" | head -60
    ;;
  *)
    echo "unknown step: $step" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment, idempotently.
#
#   tools/setup_env.sh            # runtime + test requirements, builds mmdet_deform._C
#
# Every version comes from requirements/constraints.txt (the lock of the
# development environment; every `pip install` here runs under it with `-c`),
# while the package itself only states ranges (requirements/runtime.txt).
#
# Steps, each skipped when already done (a second run takes seconds):
#   1. `.venv/` with python3.11 and the pinned torch (the CPU build).
#   2. the pinned mmcv (with its compiled ops) and mmengine wheels, built from
#      source once in a throwaway build venv (mmcv's setup.py needs
#      setuptools<70, recent torch wants >=77) and cached in
#      ~/.cache/mmdet_deform/wheels (override with MMDET_DEFORM_CACHE).
#   3. requirements/{build,runtime,openmmlab,tests,deploy}.txt (deploy: the
#      ONNX exporter, ONNX Runtime and OpenVINO, so the tests cover export).
#   4. `pip install --no-build-isolation -e .`, which compiles mmdet_deform._C;
#      redone whenever setup.py or a file under mmdet_deform/ops/csrc changes.
#
# Environment: PYTHON (interpreter, default python3.11), MMDET_DEFORM_VENV
# (default <repo>/.venv), MMDET_DEFORM_CACHE (default ~/.cache/mmdet_deform),
# MAX_JOBS (compile jobs, default: number of cores).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMDET_DEFORM_VENV:-$ROOT/.venv}"
CACHE="${MMDET_DEFORM_CACHE:-$HOME/.cache/mmdet_deform}"
WHEELS="$CACHE/wheels"
PYTHON="${PYTHON:-python3.11}"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
# pinned version of a package in the constraints file
pin_of() { sed -n -E "s/^$1==([^ #]+).*/\1/p" "$CONSTRAINTS"; }
TORCH_VERSION="$(pin_of torch)"
MMCV_VERSION="$(pin_of mmcv)"
MMENGINE_VERSION="$(pin_of mmengine)"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '[setup_env] %s\n' "$*" >&2; }
now() { date +%s; }
hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  log "error: $PYTHON not found; set PYTHON=/path/to/python3.11"
  exit 1
fi

# --- 1. the venv and torch --------------------------------------------------
t0=$(now)
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__ != '$TORCH_VERSION')" 2>/dev/null; then
  log "installing torch $TORCH_VERSION"
  "${PIP[@]}" install -q -c "$CONSTRAINTS" torch
  log "torch installed in $(( $(now) - t0 ))s"
fi

# --- 2. mmcv / mmengine wheels, built once and cached -----------------------
find_wheel() { compgen -G "$WHEELS/$1-$2-*.whl" | head -n 1 || true; }
MMCV_WHEEL="$(find_wheel mmcv "$MMCV_VERSION")"
MMENGINE_WHEEL="$(find_wheel mmengine "$MMENGINE_VERSION")"
if [ -z "$MMCV_WHEEL" ] || [ -z "$MMENGINE_WHEEL" ]; then
  t1=$(now)
  mkdir -p "$WHEELS"
  BUILD_VENV="$(mktemp -d "${TMPDIR:-/tmp}/mmdet_deform_build.XXXXXX")"
  trap 'rm -rf "$BUILD_VENV"' EXIT
  log "creating a throwaway build venv in $BUILD_VENV (setuptools<70 for mmcv's setup.py)"
  "$PYTHON" -m venv "$BUILD_VENV"
  BPIP=("$BUILD_VENV/bin/python" -m pip)
  "${BPIP[@]}" install -q -c "$CONSTRAINTS" torch
  # torch declares setuptools>=77; the old one is needed only here, so the
  # conflict pip reports inside this throwaway venv is expected.
  "${BPIP[@]}" install -q --no-deps "setuptools<70"
  "${BPIP[@]}" install -q -c "$CONSTRAINTS" wheel ninja numpy opencv-python-headless 2>&1 \
    | grep -v -E "dependency conflicts|requires setuptools" || true
  # cv2 importable at build time makes both setup.py files skip their
  # `opencv-python` requirement, so the runtime venv keeps the headless build.
  if [ -z "$MMENGINE_WHEEL" ]; then
    log "building mmengine $MMENGINE_VERSION wheel"
    "${BPIP[@]}" wheel -q --no-build-isolation --no-deps --no-binary mmengine \
      -w "$WHEELS" "mmengine==$MMENGINE_VERSION"
  fi
  if [ -z "$MMCV_WHEEL" ]; then
    log "building mmcv $MMCV_VERSION ops from source, the longest step (cached afterwards in $WHEELS)"
    MMCV_WITH_OPS=1 FORCE_CUDA=0 "${BPIP[@]}" wheel -q --no-build-isolation --no-deps \
      -w "$WHEELS" "mmcv==$MMCV_VERSION"
  fi
  rm -rf "$BUILD_VENV"
  trap - EXIT
  MMCV_WHEEL="$(find_wheel mmcv "$MMCV_VERSION")"
  MMENGINE_WHEEL="$(find_wheel mmengine "$MMENGINE_VERSION")"
  log "mmcv/mmengine wheels built in $(( $(now) - t1 ))s"
fi

# --- 3. the other requirements ----------------------------------------------
DEPS_STAMP="$VENV/.mmdet_deform_deps"
deps_hash="$(hash_of "$ROOT"/requirements/{build,runtime,openmmlab,tests,deploy,constraints}.txt)"
deps_hash="$deps_hash-$(basename "$MMCV_WHEEL")-$(basename "$MMENGINE_WHEEL")"
if [ "$(cat "$DEPS_STAMP" 2>/dev/null)" != "$deps_hash" ]; then
  t2=$(now)
  log "installing runtime, build, test and deployment requirements"
  "${PIP[@]}" install -q -c "$CONSTRAINTS" opencv-python-headless numpy
  "${PIP[@]}" install -q --no-deps "$MMENGINE_WHEEL" "$MMCV_WHEEL"
  "${PIP[@]}" install -q -c "$CONSTRAINTS" -r "$ROOT/requirements/build.txt" \
    -r "$ROOT/requirements/runtime.txt" -r "$ROOT/requirements/openmmlab.txt" \
    -r "$ROOT/requirements/tests.txt" -r "$ROOT/requirements/deploy.txt"
  "${PIP[@]}" check
  echo "$deps_hash" >"$DEPS_STAMP"
  log "requirements installed in $(( $(now) - t2 ))s"
fi

# --- 4. the package and its compiled op -------------------------------------
EXT_STAMP="$VENV/.mmdet_deform_ext"
ext_hash="$(hash_of "$ROOT/setup.py" $(find "$ROOT/mmdet_deform/ops/csrc" -type f | sort))"
if [ "$(cat "$EXT_STAMP" 2>/dev/null)" != "$ext_hash" ] \
  || ! ls "$ROOT"/mmdet_deform/_C*.so >/dev/null 2>&1; then
  t3=$(now)
  log "building mmdet_deform._C (pip install --no-build-isolation -e .)"
  (cd "$ROOT" && "${PIP[@]}" install -q --no-build-isolation --no-deps -e .)
  echo "$ext_hash" >"$EXT_STAMP"
  log "mmdet_deform built in $(( $(now) - t3 ))s"
fi
log "environment ready in $(( $(now) - t0 ))s: $VENV"

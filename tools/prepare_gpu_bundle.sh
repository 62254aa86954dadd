#!/usr/bin/env bash
# Downloads, on a machine with registry access, what a GPU session needs and
# the GPU machine (no network; Python 3.12 with its own torch) lacks, into
# build/gpu_bundle (git-ignored; pass it to the device tool as `carry`):
#   wheels/  pytest (+ deps), ninja, setuptools<70 (mmcv 2.1's setup.py
#            imports pkg_resources), wheel
#   sdist/   mmcv-2.1.0.tar.gz, built there as the speed baseline
# With --full, also the runtime dependencies that make `import mmcv.ops`
# work there (mmengine, opencv-python-headless, Pillow, ...): about 57 MB,
# close to the 64 MiB the device tool carries; without them the baseline is
# reached by loading mmcv's compiled `_ext` directly (see docs/cuda.md).
#
# Usage: tools/prepare_gpu_bundle.sh [--full] [OUT_DIR]
set -euo pipefail

FULL=0
if [[ "${1:-}" == "--full" ]]; then
  FULL=1
  shift
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/build/gpu_bundle}"
PYTHON="${PYTHON:-python3.11}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

rm -rf "$OUT"
mkdir -p "$OUT/wheels" "$OUT/sdist"

# Wheels for CPython 3.12 on x86-64 Linux, without dependency resolution
# (every needed package is listed).
PACKAGES=(pytest pluggy iniconfig packaging ninja "setuptools<70" wheel)
if [[ $FULL == 1 ]]; then
  PACKAGES+=(mmengine==0.10.7 addict yapf platformdirs tomli termcolor rich markdown-it-py
    mdurl pygments pyyaml "opencv-python-headless<4.11" pillow)
fi
"$PYTHON" -m pip download -q --dest "$OUT/wheels" --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any "${PACKAGES[@]}" 2>&1 \
  | grep -v "^WARNING: Location" || true

# mmcv's sdist: pip prepares its metadata, which needs pkg_resources
# (setuptools<70), so download it from a throwaway venv.
TMP_VENV="$(mktemp -d "${TMPDIR:-/tmp}/mmdet_deform_sdist.XXXXXX")"
trap 'rm -rf "$TMP_VENV"' EXIT
"$PYTHON" -m venv "$TMP_VENV"
"$TMP_VENV/bin/pip" install -q "setuptools<70" wheel 2>&1 | grep -v "^WARNING: Location" || true
"$TMP_VENV/bin/pip" download -q --dest "$OUT/sdist" --no-binary=:all: --no-deps \
  --no-build-isolation mmcv==2.1.0 2>&1 | grep -v "^WARNING: Location" || true

ls "$OUT/sdist/mmcv-2.1.0.tar.gz" >/dev/null
echo "bundle in $OUT ($(du -sh "$OUT" | cut -f1)):"
ls -1 "$OUT/wheels" "$OUT/sdist" | sed 's/^/  /'

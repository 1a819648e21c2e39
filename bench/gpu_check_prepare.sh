#!/usr/bin/env bash
# Fills build/gpu_carry with the wheels bench/gpu_check.sh installs on the GPU machine when that machine lacks
# them: ninja (torch's extension builder needs it) and a pure-Python pytest with its dependencies. That machine
# has no package index, so they travel with the working tree (build/ is git-ignored: name build/gpu_carry in the
# call's carry list). Wheels for CPython 3.12 on x86-64 Linux, whatever this machine runs.
#   bash bench/gpu_check_prepare.sh [DIR]      # default build/gpu_carry
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-build/gpu_carry}
PY=${PYTHON:-python3}
# One version of each: the GPU machine installs them all with --no-deps.
WHEELS="ninja==1.13.0 pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0 packaging==25.0 pygments==2.19.2"
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
  --platform manylinux1_x86_64 --platform any -d "$DEST" $WHEELS
ls -l "$DEST"
du -sh "$DEST"

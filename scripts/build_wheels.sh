#!/usr/bin/env bash
# Build the distributable wheels into dist/ (no GPU needed: the CUDA code is compiled and linked, not run):
#   cpu   against the CPU torch of .venv (scripts/setup.sh makes it)  -> hass_ext-0.1.0+cpu.torch2.13-*.whl
#   cuda  against a CUDA torch in build/wheels/venv-cuda-build, with
#         the sm_90a kernels compiled in                              -> hass_ext-0.1.0+cu130.torch2.14-*.whl
# Usage: scripts/build_wheels.sh [cpu|cuda|all]   (default: all)
# Each wheel requires exactly the torch it was built against (the C++ ABI changes between torch releases).
# Env: CUDA_TORCH (torch version of the CUDA wheel, default 2.14.1), CPU_PYTHON (a python whose torch is a CPU
# build; default .venv/bin/python), CUDA_HOME (default /usr/local/cuda), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHAT=${1:-all}
CUDA_TORCH=${CUDA_TORCH:-2.14.1}
WORK=build/wheels
export MAX_JOBS=${MAX_JOBS:-2}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
case "$WHAT" in cpu|cuda|all) ;; *) echo "usage: $0 [cpu|cuda|all]" >&2; exit 2 ;; esac
mkdir -p dist "$WORK"

# pip prints a warning for every package its extra local indexes lack; keep real messages only.
quiet_pip() { "$1" -m pip install --disable-pip-version-check -q "${@:2}" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }

# A copy of the sources git knows about (untracked but not ignored included), so that no in-place build
# output (hass_ext/_C*.so) or stray file ends up in a wheel. Modification times are kept and each kind
# has its own object dir, so rebuilds stay incremental.
stage() {
  local kind=$1 src=$WORK/src-$1
  rm -rf "$src" && mkdir -p "$src"
  git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"
  done | xargs -0 cp -p --parents -t "$src"
  printf '[build]\nbuild_base = %s\n' "$ROOT/$WORK/obj-$kind" > "$src/setup.cfg"
}

build() {  # build KIND PYTHON HASS_BUILD_CUDA
  local kind=$1 py=$2 t0=$SECONDS
  stage "$kind"
  rm -f dist/hass_ext-*+"$( [ "$kind" = cpu ] && echo cpu || echo cu)"*.whl
  echo "== building the $kind wheel (torch $("$py" -c 'import torch; print(torch.__version__)'))"
  # that python's own ninja: another ninja version discards the build log and recompiles everything
  PATH="$(dirname "$py"):$PATH" HASS_BUILD_CUDA=$3 "$py" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps -q \
    -w dist "$WORK/src-$kind" > "$WORK/build-$kind.log" 2>&1 || { tail -n 60 "$WORK/build-$kind.log"; exit 1; }
  local whl
  whl=$(ls -t dist/hass_ext-*+"$( [ "$kind" = cpu ] && echo cpu || echo cu)"*.whl | head -n 1)
  echo "   $whl ($(du -h "$whl" | cut -f1), $((SECONDS - t0)) s)"
}

if [ "$WHAT" != cuda ]; then
  CPU_PYTHON=${CPU_PYTHON:-.venv/bin/python}
  [ -x "$CPU_PYTHON" ] || bash scripts/setup.sh
  if ! "$CPU_PYTHON" -c "import torch, sys; sys.exit(torch.version.cuda is not None)"; then
    echo "CPU_PYTHON=$CPU_PYTHON has a CUDA torch; the CPU wheel must be built against a CPU torch" >&2
    exit 1
  fi
  build cpu "$CPU_PYTHON" 0
fi

if [ "$WHAT" != cpu ]; then
  venv=$WORK/venv-cuda-build
  if ! "$venv/bin/python" -c "import torch, sys, setuptools, wheel, ninja, numpy
sys.exit(torch.__version__.split('+')[0] != '$CUDA_TORCH' or torch.version.cuda is None)" 2>/dev/null; then
    echo "== creating $venv with torch $CUDA_TORCH (a CUDA build, several GB)"
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
    quiet_pip "$venv/bin/python" "torch==$CUDA_TORCH" setuptools wheel ninja numpy
  fi
  build cuda "$venv/bin/python" 1
fi

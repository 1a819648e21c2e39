#!/usr/bin/env bash
# Set up everything, compile-check the CUDA kernels for sm_90a and their host bindings, run the C++ unit tests
# (CMake + ctest), then run the pytest suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

echo "== CMake: CUDA compile-checks (sm_90a kernels, host bindings) and C++ unit tests"
mkdir -p build
cmake -S . -B build/cmake -DPython3_EXECUTABLE="$(command -v python)" > build/cmake-configure.log 2>&1 || { cat build/cmake-configure.log; exit 1; }
grep -E "hass_ext:" build/cmake-configure.log || true
cmake --build build/cmake -j "${MAX_JOBS:-2}"
ctest --test-dir build/cmake --output-on-failure

echo "== pytest"
python -m pytest tests -q "$@"

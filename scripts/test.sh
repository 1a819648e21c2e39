#!/usr/bin/env bash
# Set up everything, compile-check the CUDA kernels for sm_90a and run the C++ unit tests (CMake + ctest),
# then run the pytest suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

echo "== CMake: CUDA compile-check (sm_90a) and C++ unit tests"
mkdir -p build
cutlass=$(python -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")
cmake -S . -B build/cmake -DCUTLASS_INCLUDE_DIRS="$cutlass" > build/cmake-configure.log 2>&1 || { cat build/cmake-configure.log; exit 1; }
grep -E "hass_ext:" build/cmake-configure.log || true
cmake --build build/cmake -j "${MAX_JOBS:-2}"
ctest --test-dir build/cmake --output-on-failure

echo "== pytest"
python -m pytest tests -q "$@"

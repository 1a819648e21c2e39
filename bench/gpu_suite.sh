#!/usr/bin/env bash
# The GPU machine's checks in one run (Hopper, sm_90a): build the CUDA path, run the test suite with the GPU
# tests, compute-sanitizer (memcheck, racecheck) over the CUDA kernels, kernel benchmarks at Llama-3-8B shapes
# and one full speculative round against a vanilla decode step. Results go to bench/results with the device name.
#   bash bench/gpu_suite.sh            # on a GPU machine (uses the python/torch found there)
#   bash bench/gpu_suite.sh --tiny     # CPU, tiny shapes: checks the suite itself runs
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
PY=${PYTHON:-python}
OUT=${OUT_DIR:-bench/results}
mkdir -p "$OUT"
status=0
step() { echo; echo "== $*"; }

if [ "$TINY" = 0 ]; then
  step "build the CUDA path (HASS_BUILD_CUDA=1, sm_90a)"
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
  HASS_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -e . -q || exit 1
  $PY -c "import hass_ext; print(hass_ext.kernel_report())"
  dev=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")

  step "tests (GPU tests included)"
  $PY -m pytest tests -q -x --ignore=tests/test_wheels.py -k "cuda or gpu or compact_kv or verify or attention or distill" \
    2>&1 | tee "$OUT/gpu_tests-$dev.log" | tail -n 5 || status=1

  if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
      step "compute-sanitizer --tool $tool"
      compute-sanitizer --tool "$tool" --error-exitcode 9 $PY -m pytest tests -q -x -k cuda \
        --ignore=tests/test_wheels.py > "$OUT/sanitizer-$tool-$dev.log" 2>&1 \
        && echo "$tool: clean" || { echo "$tool: FAILED (see $OUT/sanitizer-$tool-$dev.log)"; status=1; }
    done
  fi
  QUICK=""
else
  QUICK="--quick"
fi

step "kernel benchmarks"
$PY bench/run_all.py $QUICK --skip bench_round --out-dir "$OUT" || status=1

step "one speculative round vs one vanilla decode step"
if [ "$TINY" = 0 ]; then
  $PY bench/bench_round.py --shape llama3-8b --out-dir "$OUT" || status=1
else
  $PY bench/bench_round.py --tiny --out-dir "$OUT" || status=1
fi
exit $status

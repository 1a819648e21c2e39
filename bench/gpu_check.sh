#!/usr/bin/env bash
# The GPU machine's check in one command, sized for one H100/H200 and at most 8 minutes: build the CUDA path
# against that machine's own torch, run exactly the CUDA tests, the kernel benchmarks at Llama-3-8B shapes, one
# speculative round per target attention (hass_tree, sdpa), and compute-sanitizer memcheck + racecheck over a
# handful of tiny cases. Each step runs under `timeout` inside one overall time budget, so a slow or hung step
# ends on its own and every later step still gets its turn (or is marked skipped); results are written as each
# step ends, so whatever finished comes back even if the whole command is killed.
#
#   bash bench/gpu_check.sh              # on the GPU machine: results in $OUT (default bench/results/gpu_check)
#   bash bench/gpu_check.sh --dry-run    # any machine, no GPU: every step at tiny shapes on the CPU (no CUDA
#                                        # build; prints what it would run where a step has no CPU path)
#   --budget SECONDS                     # the overall time budget (default 470; dry run 150)
#
# What comes back ($OUT, at most 8 files): summary.md, env.txt, build.log, tests.log, tests.xml (junit),
# bench.tar.gz (each benchmark's JSON/Markdown and its log), sanitizer.log.
# Python tools the machine may lack (pytest, ninja) are installed from wheels in build/gpu_carry, filled here by
# bench/gpu_check_prepare.sh and carried along. docs/gpu_check.md has the exact call.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=${2:?--budget needs a number of seconds}; shift ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run] [--budget SECONDS]" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$BUDGET" ]; then BUDGET=$([ "$DRY" = 1 ] && echo 150 || echo 470); fi
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check: --budget must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac

if [ "$DRY" = 1 ]; then OUT=${OUT:-${TMPDIR:-/tmp}/gpu_check_dry}; else OUT=${OUT:-$ROOT/bench/results/gpu_check}; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
BENCH=$WORK/bench
mkdir -p "$BENCH"
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
CARRY=${GPU_CHECK_CARRY:-$ROOT/build/gpu_carry}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 0 ]; then
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
  if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda PATH="/usr/local/cuda/bin:$PATH"
  fi
fi
START=$(date +%s)
RESERVE=8  # seconds kept back for the bench tarball and the summary
ROWS=$WORK/rows.tsv
: > "$ROWS"
BUILD_OK=1

elapsed() { echo $(( $(date +%s) - START )); }

write_summary() {
  local name status secs limit note f
  {
    echo "# GPU check ($([ "$DRY" = 1 ] && echo "dry run, CPU" || echo "GPU"))"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ); budget ${BUDGET} s, used $(elapsed) s; device: $DEVICE"
    echo
    echo "| step | status | seconds | limit | note |"
    echo "|---|---|---|---|---|"
    while IFS=$'\t' read -r name status secs limit note; do
      echo "| $name | $status | $secs | $limit | $note |"
    done < "$ROWS"
    echo
    if [ -s "$OUT/tests.log" ]; then
      echo "Tests: $(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped)|no tests ran' "$OUT/tests.log" | tail -n 1)"
      grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | head -n 40
      echo
    fi
    for f in "$BENCH"/*.md; do
      [ -e "$f" ] || continue
      echo "## $(basename "$f")"
      echo
      head -n 40 "$f"
      echo
    done
  } > "$OUT/summary.md"
}

pack_bench() { tar -czf "$OUT/bench.tar.gz" -C "$WORK" bench 2>/dev/null; }

# step NAME LIMIT LOG CMD: runs CMD (a bash command line) under `timeout`, output appended to LOG; the limit is
# cut to what is left of the budget, and the step is skipped when too little is left.
step() {
  local name=$1 limit=$2 log=$3 cmd=$4
  local left=$(( BUDGET - $(elapsed) - RESERVE ))
  if [ "$left" -lt 5 ]; then
    printf '%s\tskipped\t0\t%s\tout of budget\n' "$name" "$limit" >> "$ROWS"
    write_summary
    echo "== $name: skipped (out of budget)"
    return 0
  fi
  local t=$(( limit < left ? limit : left ))
  echo "== $name (limit ${t} s)"
  { echo "== $name: $cmd"; echo "== limit ${t} s, started $(date -u +%H:%M:%S)"; } >> "$log"
  local s0 rc status note=""
  s0=$(date +%s)
  timeout -k 5 "$t" bash -c "$cmd" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT; note="stopped after ${t} s" ;;
    *) status=FAILED; note="exit $rc" ;;
  esac
  if [ "$status" != ok ] && grep -qE "Device not supported|Target application terminated before first instrumented API call" "$log" 2>/dev/null \
     && [[ "$name" == sanitizer* ]]; then
    status=unsupported; note="compute-sanitizer cannot attach on this runtime"
  fi
  echo "== $name: $status ($(( $(date +%s) - s0 )) s) $note" | tee -a "$log"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - s0 ))" "$t" "$note" >> "$ROWS"
  write_summary
  [ "$status" = ok ]
}

skip() {  # skip NAME REASON
  printf '%s\tskipped\t0\t-\t%s\n' "$1" "$2" >> "$ROWS"
  write_summary
  echo "== $1: skipped ($2)"
}

# ---- environment and tools ------------------------------------------------------------------------------
DEVICE="(see env.txt)"
step env 30 "$OUT/env.txt" "
  date -u; uname -srm; echo
  command -v nvidia-smi >/dev/null && nvidia-smi || echo 'nvidia-smi: not found'
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo 'nvcc: not found'
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -n 1 || echo 'compute-sanitizer: not found'
  $PY -c 'import sys, torch, transformers; print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"cuda\", torch.version.cuda, \"| transformers\", transformers.__version__); print(\"device:\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"none\")'
  echo '== carried tools'
  have_pytest=1; $PY -c 'import pytest' 2>/dev/null || have_pytest=0
  have_ninja=1; command -v ninja >/dev/null || $PY -c 'import ninja' 2>/dev/null || have_ninja=0
  echo \"pytest present: \$have_pytest, ninja present: \$have_ninja\"
  wheels=''  # only what is missing: a carried wheel must not shadow a package the machine has
  [ \$have_pytest = 1 ] || wheels=\"\$wheels pytest- pluggy- iniconfig- packaging- pygments-\"
  [ \$have_ninja = 1 ] || wheels=\"\$wheels ninja-\"
  files=''
  for w in \$wheels; do
    f=\$(ls '$CARRY'/\$w*.whl 2>/dev/null | head -n 1)
    [ -n \"\$f\" ] || { echo \"no \${w%-} wheel in $CARRY: run bench/gpu_check_prepare.sh and carry build/gpu_carry\"; exit 1; }
    files=\"\$files \$f\"
  done
  if [ -n \"\$files\" ]; then
    if [ $DRY = 1 ]; then echo \"dry run: would install\$files\"; else
      $PY -m pip install -q --no-index --no-deps --no-compile --target '$WORK/site' \$files || exit 1
      echo \"installed\$files\"; fi
  fi
"
DEVICE=$(sed -n 's/^device: //p' "$OUT/env.txt" | tail -n 1)
DEVICE=${DEVICE:-unknown}
if [ -d "$WORK/site" ]; then  # tools installed from the carried wheels
  export PYTHONPATH="$PYTHONPATH:$WORK/site" PATH="$PATH:$WORK/site/bin"
fi

# ---- build ----------------------------------------------------------------------------------------------
# The compiler: the system's g++ when there is one. A toolchain that links its own libstdc++ into _C (seen on one
# GPU image, whose CC/CXX named /opt/gcc) puts a second C++ runtime in the process, and the first std::ostream use
# (any error message) crashes; GPU_CHECK_CXX=keep keeps the environment's CC/CXX.
if [ "$DRY" = 0 ] && [ "${GPU_CHECK_CXX:-system}" = system ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++
fi
BUILD_CMD="rm -rf build/temp.*; echo \"CC=\${CC:-} CXX=\${CXX:-}: \$(\${CXX:-c++} --version | head -n 1)\";
  HASS_BUILD_CUDA=1 MAX_JOBS=16 $PY setup.py build_ext --inplace"
# An op's error message (stream formatting in the extension) must come back as a Python error, not a crash.
RUNTIME_CHECK="$PY -c 'import torch, hass_ext
try:
    torch.ops.hass.small_linear(torch.zeros(2, 3), torch.zeros(4, 5), None)
except RuntimeError as e:
    print(\"error message from the extension:\", str(e).splitlines()[0])
else:
    raise SystemExit(\"small_linear accepted a bad shape\")'"
REPORT="$PY -c 'import hass_ext; print(hass_ext.kernel_report())'"
if [ "$DRY" = 1 ]; then
  step build 60 "$OUT/build.log" "echo 'dry run: would run: $BUILD_CMD'; $REPORT" || BUILD_OK=0
else
  step build 240 "$OUT/build.log" "$BUILD_CMD && $REPORT && $PY -c 'import hass_ext, sys; sys.exit(\"cuda\" not in hass_ext.available_devices())'" \
    || BUILD_OK=0
fi

if [ "$BUILD_OK" = 1 ]; then step cxx_runtime 30 "$OUT/build.log" "$RUNTIME_CHECK"; fi  # reported, not a gate

# ---- tests: exactly the CUDA tests, every failure reported (no -x) ---------------------------------------
PYTEST="$PY -m pytest -p no:cacheprovider -q -rfE --junitxml=$OUT/tests.xml"
if [ "$BUILD_OK" = 0 ]; then
  skip tests "the build failed"
elif [ "$DRY" = 1 ]; then  # the same plumbing on a CPU subset (the T < F and tie cases' CPU halves)
  step tests 60 "$OUT/tests.log" "echo 'dry run: would run: $PYTEST tests -k cuda --ignore=tests/test_wheels.py'
    $PYTEST tests/test_align_attention.py tests/test_verify_tree.py -k 'fewer_positions or ties_and_boundaries'"
else
  step tests 180 "$OUT/tests.log" "$PYTEST tests -k cuda --ignore=tests/test_wheels.py"
fi

# ---- benchmarks (Llama-3-8B shapes, bf16) and the sanitizer ----------------------------------------------
bench() {  # bench NAME LIMIT GPU_ARGS DRY_ARGS
  local name=$1 limit=$2 args=$3
  [ "$DRY" = 1 ] && args=$4
  if [ "$BUILD_OK" = 0 ]; then skip "$name" "the build failed"; return; fi
  step "$name" "$limit" "$BENCH/$name.log" "$PY bench/$name.py $args"
  pack_bench
  write_summary
}

sanitize() {  # sanitize TOOL LIMIT
  local tool=$1 limit=$2
  local cmd="compute-sanitizer --tool $tool --error-exitcode 9 $PY bench/gpu_check_ops.py"
  if [ "$BUILD_OK" = 0 ]; then skip "sanitizer $tool" "the build failed"; return; fi
  if [ "$DRY" = 1 ]; then
    step "sanitizer $tool" "$limit" "$OUT/sanitizer.log" "echo 'dry run: would run: $cmd'; $PY bench/gpu_check_ops.py --device cpu"
  elif ! command -v compute-sanitizer >/dev/null; then
    skip "sanitizer $tool" "compute-sanitizer not found"
  else
    step "sanitizer $tool" "$limit" "$OUT/sanitizer.log" "$cmd"
  fi
}

bench bench_tree_attention 60 "--device cuda --out $BENCH" "--device cpu --quick --tree-only --reps 1 --out $BENCH"
bench bench_verify_tree 45 "--device cuda --llama --results-dir $BENCH" "--device cpu --quick --repeats 1 --results-dir $BENCH"
sanitize memcheck 45
sanitize racecheck 60
# one round per attention at a 1k context, then hass_tree at a 4k context and with the 16/4/4 tree
R="$PY bench/bench_round.py"
bench bench_round 150 "--device cuda --shape llama3-8b --attn hass_tree sdpa --repeats 10 --out-dir $BENCH && \
  $R --device cuda --shape llama3-8b --attn hass_tree --repeats 10 --context 4096 --out-dir $BENCH && \
  $R --device cuda --shape llama3-8b --attn hass_tree --repeats 10 --tree 16/4/4 --out-dir $BENCH" \
  "--device cpu --tiny --repeats 1 --attn hass_tree sdpa --out-dir $BENCH && \
  $R --device cpu --tiny --repeats 1 --attn hass_tree --context 96 --out-dir $BENCH && \
  $R --device cpu --tiny --repeats 1 --attn hass_tree --tree 16/4/4 --out-dir $BENCH"
# fixed-shape rounds: eager and replayed from a CUDA graph, against eager and replayed vanilla steps
S="$PY bench/bench_static_round.py"
bench bench_static_round 90 "--device cuda --shape llama3-8b --tree 60/6/10 --out-dir $BENCH && \
  $S --device cuda --shape llama3-8b --tree 16/4/4 --out-dir $BENCH && \
  $S --device cuda --shape llama3-8b --tree 60/6/10 --context 4096 --out-dir $BENCH" \
  "--device cpu --tiny --repeats 1 --out-dir $BENCH && $S --device cpu --tiny --repeats 1 --tree 16/4/4 --out-dir $BENCH"
bench bench_distill_loss 60 "--device cuda --reps 10 --out-dir $BENCH" "--device cpu --quick --out-dir $BENCH"
bench bench_compact_kv 20 "--device cuda --out-dir $BENCH" "--device cpu --quick --out-dir $BENCH"
bench bench_small_linear 45 "--device cuda --shape-budget 6 --out-dir $BENCH" "--device cpu --quick --out-dir $BENCH"
# batched rounds at B = 1, 2, 4, 8 in vanilla steps (Llama-3-8B shapes, 1k context per row), then B rows decoded
# together against each alone; no new B starts after 25 s, and the results are written after every B
bench bench_batch 40 "--rounds --device cuda --shape llama3-8b --budget 25 --out-dir $BENCH" \
  "--rounds --device cpu --tiny --out-dir $BENCH"

pack_bench
write_summary
files=$(find "$OUT" -type f | wc -l)
if [ "$files" -gt 8 ]; then
  echo "gpu_check: $files files in $OUT, more than the 8 that come back" | tee -a "$OUT/summary.md"
fi
echo
cat "$OUT/summary.md"
! grep -qE $'\t(FAILED|TIMEOUT)\t' "$ROWS"

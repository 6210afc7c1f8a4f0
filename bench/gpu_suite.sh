#!/usr/bin/env bash
# The one command to run when a GPU is lent (see README, "Benchmarks"): kernel tests, kernel benchmarks,
# training-step benchmark with the step-time model beside it, and sampling benchmark, each stage time-boxed
# and written to OUT as soon as it finishes, plus summary.json / summary.md rewritten after every stage.
#
#   bash bench/gpu_suite.sh [OUT]            # GPU: XL/2 16x256x256 shapes, <= 8 minutes in all
#   bash bench/gpu_suite.sh --dry-run [OUT]  # CPU: the same script at tiny shapes (tests/test_gpu_suite_dry.py)
#
# OUT defaults to $OUT (the device tool's folder), else bench/results/gpu_suite. Nothing is installed: it runs
# on the machine's python3 (or $PYTHON) with the tree on PYTHONPATH; the csrc extension is optional.
# Stage budgets (seconds, GPU): kernel tests 85, kernels 110, train 175, sample 30 + 55; the whole suite is
# capped at MG_SUITE_BUDGET_S (default 470) and a stage never starts past it.
set -u
DRY=0
DEST=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) DEST="$arg" ;;
  esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
DEST="${DEST:-${OUT:-$ROOT/bench/results/gpu_suite}}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
BUDGET="${MG_SUITE_BUDGET_S:-470}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LOG="$DEST/suite.log"
: > "$LOG"
START=$SECONDS
echo "gpu_suite: dry_run=$DRY out=$DEST python=$PY budget=${BUDGET}s" | tee -a "$LOG"

# stage NAME LIMIT_S [--junit XML] [--copy FILE] -- COMMAND...: run COMMAND under `timeout` (SIGINT first: pytest
# and the benchmarks keep what they finished), log it, record its status in summary.json at once (--copy: the
# command's JSON, written elsewhere, becomes OUT/NAME.json).
stage() {
  local name="$1" limit="$2"; shift 2
  local extra=()
  while [ "$1" != "--" ]; do extra+=("$1"); shift; done
  shift
  local left=$(( BUDGET - (SECONDS - START) ))
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped (suite budget spent)" | tee -a "$LOG"
    "$PY" bench/gpu_suite_report.py stage "$DEST" "$name" -1 0 "$limit" --note "suite budget spent" ${extra[@]+"${extra[@]}"} >> "$LOG" 2>&1
    return
  fi
  local t=$(( limit < left ? limit : left ))
  echo "== $name (limit ${t}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout -s INT -k 15 "$t" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(( SECONDS - t0 ))s" | tee -a "$LOG"
  "$PY" bench/gpu_suite_report.py stage "$DEST" "$name" "$rc" "$(( SECONDS - t0 ))" "$t" ${extra[@]+"${extra[@]}"} >> "$LOG" 2>&1
}

skip() {  # skip NAME REASON
  echo "== $1: skipped ($2)" | tee -a "$LOG"
  "$PY" bench/gpu_suite_report.py stage "$DEST" "$1" -1 0 0 --note "$2" >> "$LOG" 2>&1
}

# ---- environment -------------------------------------------------------------------------------------
timeout 60 "$PY" bench/gpu_suite_report.py env "$DEST" $([ $DRY = 1 ] && echo --dry-run) >> "$LOG" 2>&1 \
  || echo "env: failed (see suite.log)" | tee -a "$LOG"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv >> "$LOG" 2>&1

KTESTS=(tests/test_modulate.py tests/test_st_attention.py tests/test_gated_cross_attn.py)
for f in tests/test_residual_modulate*.py; do [ -e "$f" ] && KTESTS+=("$f"); done

if [ $DRY = 1 ]; then
  # ---- dry run: CPU, tiny shapes, Triton through its interpreter --------------------------------------
  stage kernel_tests 60 --junit "$WORK/kt.xml" -- env TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider \
    "${KTESTS[@]}" -k "validation or bad_shapes" --junitxml="$WORK/kt.xml" -rfE
  stage bench_kernels 40 -- "$PY" bench/bench_kernels.py --size 4x64x64 --batch 1 --hidden 64 --heads 4 \
    --caption-tokens 8 --rep 2 --modes fwd,full --no-compile --out "$DEST"
  CONFIGS="xl2:ref:none:2,xl2:fused:every-2:2,grown:fused:full:2"
  [ "${MG_SUITE_DRY_COMPILE:-0}" = 1 ] && CONFIGS="$CONFIGS,xl2:compile:none:2"
  stage bench_train 60 -- "$PY" bench/bench_train.py --tiny --configs "$CONFIGS" --warmup 1 --steps 2 \
    --profile-steps 1 --out "$DEST"
  stage bench_sample_nocompile 40 --copy "$WORK/sample_nc/bench_sample.json" -- "$PY" bench/bench_sample.py --preset STDiT-tiny --size 4x64x64 --steps 100 \
    --caption-tokens 8 --caption-channels 32 --modes two --rep 2 --no-compile --out "$WORK/sample_nc"
  skip bench_sample "dry run: compiling the sampler on a CPU takes minutes"
else
  # ---- GPU: native Triton, XL/2 shapes ----------------------------------------------------------------
  XDIST=()
  "$PY" -c "import xdist" 2> /dev/null && XDIST=(-n 4)
  stage kernel_tests 85 --junit "$WORK/kt.xml" -- env TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider \
    ${XDIST[@]+"${XDIST[@]}"} "${KTESTS[@]}" --junitxml="$WORK/kt.xml" -rfE
  stage bench_kernels 110 -- "$PY" bench/bench_kernels.py --size 16x256x256 --batch 8 --out "$DEST"
  # eager reference first (the 2.5x target's denominator), then the fused and compiled configurations
  stage bench_train 175 -- "$PY" bench/bench_train.py \
    --configs "xl2:ref:none:4,xl2:fused:none:8,grown:fused:none:4,xl2:compile:none:8,grown:compile:none:4" \
    --warmup 2 --steps 4 --profile-steps 1 --out "$DEST"
  # sampling: fused kernels without compilation first (cheap), then the compiled + CUDA-graph path
  stage bench_sample_nocompile 30 --copy "$WORK/sample_nc/bench_sample.json" -- "$PY" bench/bench_sample.py --preset STDiT-XL/2 --size 16x256x256 --steps 100 \
    --modes two --rep 10 --no-compile --out "$WORK/sample_nc"
  stage bench_sample 55 -- "$PY" bench/bench_sample.py --preset STDiT-XL/2 --size 16x256x256 --steps 100 \
    --modes two --rep 10 --out "$DEST"
fi
echo "gpu_suite: done in $(( SECONDS - START ))s; summary: $DEST/summary.md" | tee -a "$LOG"
cat "$DEST/summary.md" 2> /dev/null
exit 0

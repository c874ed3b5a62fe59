#!/usr/bin/env bash
# What only a GPU can show. Results (tables, logs, summary.md) go to ${OUT:-gpu_results}/.
# Every step runs under its own budget and writes its rows as it finishes each one, so a
# step cut off by its budget leaves what it measured; steps.txt logs each step's time
# against its budget, and summary.md says which steps were cut off.
#
#   bash benchmarks/gpu_run.sh                   # first-look: one call, <= 6 min on one H200
#   PHASE=tests bash benchmarks/gpu_run.sh       # the suite on the GPU: a second call (<= 8 min)
#   DRY_RUN=1 [PHASE=tests] bash benchmarks/gpu_run.sh  # either phase on this CPU at tiny sizes
#   PHASE=bench BATCH=1024 bash benchmarks/gpu_run.sh   # the B x C grid at one batch size (~8 min)
#
# first-look, in order, with each step's budget in seconds (345 in all, 5 min 45 s):
#   machine     -  GPU, driver, torch, Triton, nvcc, ninja, up front
#   build     120  the CUDA extension (no network: the installed torch, pybind11, ninja). The
#                  Triton rows never depend on it: the package imports from the source tree.
#   large-C    90  the fused loss against a float32 oracle at C = 8M, D = 512, bf16 (past 2^31
#                  weight elements), for triton (both backwards) and cpp
#   margin     75  ArcFace fwd+bwd at B = 1024, D = 512, C = 1M, bf16: every backend beside
#                  the naive loss, the insightface-style loss and the GEMM floor
#   plain      60  plain linear cross-entropy at the same size: ours (NormSoftmax) beside
#                  torch's, apple's cut-cross-entropy and Liger-Kernel (wheels from
#                  benchmarks/fetch_peers.sh, carried in benchmarks/peers/, unpacked outside
#                  the results folder onto PYTHONPATH, not installed)
#   summary     -  summary.md: one screen of all of it
# The autotuner's choices are logged in each table's text (TRITON_PRINT_AUTOTUNING=1).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PHASE=${PHASE:-first-look}
DRY_RUN=${DRY_RUN:-0}
BATCH=${BATCH:-1024}
BUDGET_BUILD=${BUDGET_BUILD:-120} BUDGET_LARGE=${BUDGET_LARGE:-90}
BUDGET_MARGIN=${BUDGET_MARGIN:-75} BUDGET_PLAIN=${BUDGET_PLAIN:-60} BUDGET_TESTS=${BUDGET_TESTS:-480}
PEERS=${PEERS_DIR:-${TMPDIR:-/tmp}/margin_kernels_peers}
# the source tree first: a failed build loses the cpp rows, never the Triton ones
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TRITON_PRINT_AUTOTUNING=1
start=$SECONDS
log() { echo "gpu_run.sh [$((SECONDS - start)) s] $*" | tee -a "$OUT/steps.txt"; }

step() {  # step NAME BUDGET OUTFILE CMD...: CMD under its budget, output to OUTFILE, its time logged
  local name=$1 budget=$2 outfile=$3
  shift 3
  local t0=$SECONDS
  timeout --kill-after=5 "$budget" "$@" > "$OUT/$outfile" 2>&1
  local rc=$?
  local verdict="exit $rc"
  if [[ $rc == 124 || $rc == 137 ]]; then verdict="CUT OFF at its budget (exit $rc)"; fi
  log "$name: $verdict in $((SECONDS - t0)) s (budget $budget s)"
}

if [[ "$DRY_RUN" == "1" ]]; then
  DEVICE=cpu DTYPE=float32
  export TRITON_INTERPRET=1
  LARGE=(--classes 3000 --dim 64 --batch 16 --block 1024)
  SIZE=(--batch 32 --dim 32 --classes 2000 --repeat 1)
  MARGIN_IMPLS=(reference insightface cpp gemm-floor)
  PLAIN_IMPLS=(torch-linear-ce cpp cce)
else
  DEVICE=cuda DTYPE=bfloat16
  LARGE=(--classes 8000000 --dim 512 --batch 1024)
  SIZE=(--batch 1024 --dim 512 --classes 1000000 --repeat 5)
  MARGIN_IMPLS=(reference insightface triton triton-split cpp gemm-floor cpp-gemms)
  PLAIN_IMPLS=(torch-linear-ce triton cpp cce liger)
fi
: > "$OUT/steps.txt"

{
  if [[ "$DRY_RUN" == "1" ]]; then echo "dry run on the CPU (TRITON_INTERPRET=1)"; else
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; fi
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "nvcc: $( (nvcc --version 2>/dev/null || echo none) | tail -1)"
  echo "ninja: $(ninja --version 2>/dev/null || echo none)"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

if [[ "$DRY_RUN" != "1" && "$PHASE" != "tests" ]]; then
  step build "$BUDGET_BUILD" build.txt \
    python3 -m pip install --no-build-isolation --use-pep517 --no-deps --no-index -e .
fi
python3 -c "import margin_kernels._C as c; print('cpp CUDA kernels built:', c.with_cuda)" >> "$OUT/gpu.txt" 2>&1

peers_path() {  # unpack the carried peer wheels once, outside the results; print the directory
  if compgen -G "$ROOT/benchmarks/peers/*.whl" > /dev/null && [[ ! -d "$PEERS" ]]; then
    mkdir -p "$PEERS"
    for whl in "$ROOT"/benchmarks/peers/*.whl; do python3 -m zipfile -e "$whl" "$PEERS" 2>/dev/null; done
  fi
  echo "$PEERS"
}

bench() {  # bench NAME BUDGET ARGS...: one table, as text and JSON (rewritten after every row)
  local name=$1 budget=$2
  shift 2
  step "$name" "$budget" "$name.txt" python3 -m margin_kernels.bench --device "$DEVICE" --dtype "$DTYPE" "$@" \
    --json "$OUT/$name.json"
}

if [[ "$PHASE" == "first-look" ]]; then
  step "large-C check" "$BUDGET_LARGE" large_c.txt python3 benchmarks/large_c_check.py --device "$DEVICE" \
    --dtype "$DTYPE" "${LARGE[@]}" --backends triton triton-split cpp --json "$OUT/large_c.json"
  bench bench_margin "$BUDGET_MARGIN" "${SIZE[@]}" --backends "${MARGIN_IMPLS[@]}"
  PYTHONPATH="$(peers_path):$PYTHONPATH" python3 -c \
    "import cut_cross_entropy, liger_kernel.ops.fused_linear_cross_entropy" > "$OUT/peers.txt" 2>&1
  log "peers importable (benchmarks/peers/*.whl): exit $?"
  PYTHONPATH="$(peers_path):$PYTHONPATH" bench bench_plain "$BUDGET_PLAIN" "${SIZE[@]}" --margin none \
    --backends "${PLAIN_IMPLS[@]}"
  python3 benchmarks/first_look_summary.py "$OUT" | tee "$OUT/summary.md"
fi

if [[ "$PHASE" == "tests" ]]; then
  if [[ "$DRY_RUN" == "1" ]]; then
    tests=(--collect-only -q tests)  # the rehearsal checks the step, not the suite
  else
    tests=(-q -p no:cacheprovider -m "not slow" -rs --durations=15 tests)
  fi
  step tests "$BUDGET_TESTS" tests.txt python3 -m pytest "${tests[@]}"
  tail -3 "$OUT/tests.txt"
fi

if [[ "$PHASE" == "bench" ]]; then
  for name in margin plain; do
    if [[ $name == margin ]]; then impls=(reference insightface triton triton-split cpp gemm-floor cpp-gemms); m=arcface
    else impls=(torch-linear-ce triton cpp cce liger); m=none; fi
    PYTHONPATH="$(peers_path):$PYTHONPATH" bench "bench_${name}_b$BATCH" 280 --batch "$BATCH" --dim 512 \
      --classes 100000 1000000 4000000 --repeat 5 --margin $m --backends "${impls[@]}"
  done
fi
log "phase $PHASE done"

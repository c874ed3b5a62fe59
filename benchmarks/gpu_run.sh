#!/usr/bin/env bash
# What only a GPU can show. Results (tables, logs, summary.md) go to ${OUT:-gpu_results}/,
# written as each step ends, so a run cut off by a time limit still leaves them.
#
#   bash benchmarks/gpu_run.sh                   # first-look: the default, one call of < 8 min on one H200
#   DRY_RUN=1 bash benchmarks/gpu_run.sh         # the same script on this CPU at tiny sizes (a rehearsal)
#   PHASE=tests bash benchmarks/gpu_run.sh       # the suite on the GPU only
#   PHASE=bench BATCH=1024 bash benchmarks/gpu_run.sh  # the B x C grid at one batch size (~8 min)
#
# first-look, in order (each step bounded by what is left of BUDGET_S):
#   1. build the CUDA extension (no network: the installed torch, pybind11, ninja);
#   2. the fused loss against a float32 oracle at C = 8M, D = 512, bf16 (past 2^31
#      weight elements), for triton (both backwards) and cpp;
#   3. fwd+bwd benchmark at B=1024, D=512, C=1M, bf16: every backend beside the naive
#      loss, the insightface-style loss and the GEMM floor;
#   4. plain linear cross-entropy at the same size: ours (NormSoftmax) beside torch's,
#      apple's cut-cross-entropy and Liger-Kernel (wheels from benchmarks/fetch_peers.sh,
#      carried in benchmarks/peers/ and unpacked onto PYTHONPATH, not installed);
#   5. the test suite on the GPU (-m "not slow");
#   6. summary.md: one screen of all of it.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PHASE=${PHASE:-first-look}
DRY_RUN=${DRY_RUN:-0}
BATCH=${BATCH:-1024}
BUDGET_S=${BUDGET_S:-450}  # first-look must end well inside one 10-minute call
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
start=$SECONDS
left() { local s=$((BUDGET_S - (SECONDS - start))); echo $((s > 5 ? s : 5)); }
log() { echo "gpu_run.sh [$((SECONDS - start)) s] $*" | tee -a "$OUT/steps.txt"; }

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
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

if [[ "$DRY_RUN" != "1" ]]; then
  t0=$SECONDS
  timeout "$(left)" python3 -m pip install --no-build-isolation --use-pep517 --no-deps --no-index -e . \
    > "$OUT/build.txt" 2>&1
  log "build: exit $? in $((SECONDS - t0)) s"
fi
python3 -c "import margin_kernels._C as c; print('cpp CUDA kernels built:', c.with_cuda)" >> "$OUT/gpu.txt" 2>&1

peers_path() {  # unpack the carried peer wheels once; print the directory for PYTHONPATH
  local dir=$OUT/.peers
  if compgen -G "$ROOT/benchmarks/peers/*.whl" > /dev/null; then
    mkdir -p "$dir"
    for whl in "$ROOT"/benchmarks/peers/*.whl; do python3 -m zipfile -e "$whl" "$dir" 2>/dev/null; done
  fi
  echo "$dir"
}

bench() {  # bench NAME ARGS...: one table, as text and JSON
  local name=$1
  shift
  timeout "$(left)" python3 -m margin_kernels.bench --device "$DEVICE" --dtype "$DTYPE" "$@" \
    --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
  log "$name: exit $?"
}

if [[ "$PHASE" == "first-look" ]]; then
  timeout "$(left)" python3 benchmarks/large_c_check.py --device "$DEVICE" --dtype "$DTYPE" "${LARGE[@]}" \
    --backends triton triton-split cpp --json "$OUT/large_c.json" > "$OUT/large_c.txt" 2>&1
  log "large-C check: exit $?"
  bench bench_margin "${SIZE[@]}" --backends "${MARGIN_IMPLS[@]}"
  PYTHONPATH="$(peers_path)${PYTHONPATH:+:$PYTHONPATH}" python3 -c \
    "import cut_cross_entropy, liger_kernel.ops.fused_linear_cross_entropy" > "$OUT/peers.txt" 2>&1
  log "peers importable (benchmarks/peers/*.whl): exit $?"
  PYTHONPATH="$(peers_path)${PYTHONPATH:+:$PYTHONPATH}" bench bench_plain "${SIZE[@]}" --margin none \
    --backends "${PLAIN_IMPLS[@]}"
  if [[ "$DRY_RUN" == "1" ]]; then
    tests=(--collect-only -q tests)  # the rehearsal checks the step, not the suite
  else
    tests=(-q -p no:cacheprovider -m "not slow" -rs --durations=15 tests)
  fi
  timeout "$(left)" python3 -m pytest "${tests[@]}" > "$OUT/tests.txt" 2>&1
  log "tests: exit $?"
  python3 benchmarks/first_look_summary.py "$OUT" | tee "$OUT/summary.md"
fi

if [[ "$PHASE" == "tests" ]]; then
  timeout "$(left)" python3 -m pytest -q -p no:cacheprovider -m "not slow" -rs --durations=15 tests \
    2>&1 | tee "$OUT/tests.txt"
fi

if [[ "$PHASE" == "bench" ]]; then
  for name in margin plain; do
    if [[ $name == margin ]]; then impls=(reference insightface triton triton-split cpp gemm-floor cpp-gemms); m=arcface
    else impls=(torch-linear-ce triton cpp cce liger); m=none; fi
    PYTHONPATH="$(peers_path)${PYTHONPATH:+:$PYTHONPATH}" bench "bench_${name}_b$BATCH" --batch "$BATCH" --dim 512 \
      --classes 100000 1000000 4000000 --repeat 5 --margin $m --backends "${impls[@]}"
  done
fi
log "phase $PHASE done"

#!/usr/bin/env bash
# Everything that needs a GPU, in phases that each fit one 10-minute call of the
# device tool (a fresh machine each time: every phase builds first). Results go
# to ${OUT:-gpu_results}/.
#
#   PHASE=tests bash benchmarks/gpu_run.sh             # build with CUDA, the suite on the GPU (~5 min)
#   PHASE=bench BATCH=1024 bash benchmarks/gpu_run.sh  # issue 3/4 grid at one batch size (~8 min)
#   PHASE=bench BATCH=256 bash benchmarks/gpu_run.sh
#   QUICK=1 PHASE=bench bash benchmarks/gpu_run.sh     # one size, to check that it all runs
#   PHASE=all bash benchmarks/gpu_run.sh               # all of it, on a machine without a time limit
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
PHASE=${PHASE:-all}
BATCH=${BATCH:-1024}
BUDGET_S=${BUDGET_S:-540}  # stop each phase before the device tool's 600 s limit, keeping what ran
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
start=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - start))); }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
t0=$SECONDS
python3 -m pip install --no-build-isolation --use-pep517 --no-deps -e . > "$OUT/build.txt" 2>&1
echo "build: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/gpu.txt"
python3 -c "import margin_kernels._C as c; print('cpp CUDA kernels built:', c.with_cuda)" 2>&1 | tee -a "$OUT/gpu.txt"

if [[ "$PHASE" == "tests" || "$PHASE" == "all" ]]; then
  # Every test that touches the GPU; the CPU-only slow ones (gloo ranks, AOT
  # compiles, bench end to end) ran in CI already.
  timeout "$(left)" python3 -m pytest -q -p no:cacheprovider -m "not slow" -rs --durations=15 tests \
    2>&1 | tee "$OUT/tests.txt"
fi

bench() {  # bench NAME ARGS...: one table, as text, JSON and (margin runs) a plot
  local name=$1
  shift
  timeout "$(left)" python3 -m margin_kernels.bench --device cuda --dtype bfloat16 --dim 512 "$@" \
    --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt"
}

if [[ "$PHASE" == "bench" || "$PHASE" == "all" ]]; then
  if [[ "${QUICK:-0}" == "1" ]]; then classes=(100000); else classes=(100000 1000000 4000000); fi
  batches=("$BATCH")
  [[ "$PHASE" == "all" ]] && batches=(256 1024)
  for b in "${batches[@]}"; do
    bench "bench_b$b" --batch "$b" --classes "${classes[@]}" --repeat 5 \
      --backends reference insightface triton triton-split cpp gemm-floor cpp-gemms --plot "$OUT/bench_b$b.png"
    bench "bench_nomargin_b$b" --batch "$b" --classes "${classes[@]}" --repeat 5 --margin none \
      --backends torch-linear-ce triton cpp gemm-floor
  done
fi
echo "gpu_run.sh: phase $PHASE done in $((SECONDS - start)) s" | tee -a "$OUT/gpu.txt"

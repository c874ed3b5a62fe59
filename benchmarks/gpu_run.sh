#!/usr/bin/env bash
# Everything that needs a GPU, in one command (for a session lent one through the
# device tool, or any CUDA machine): build with the CUDA kernels, run the whole
# test suite on CUDA, then the benchmark grid of issues 3 and 4. Results go to
# ${OUT:-gpu_results}/.
#
#   bash benchmarks/gpu_run.sh            # full grid (about 10 minutes on an H100)
#   QUICK=1 bash benchmarks/gpu_run.sh    # one size, to check that it all runs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install --no-build-isolation --use-pep517 --no-deps -e . 2>&1 | tail -3
python3 -c "import margin_kernels._C as c; print('cpp CUDA kernels built:', c.with_cuda)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q tests -x 2>&1 | tee "$OUT/tests.txt"

if [[ "${QUICK:-0}" == "1" ]]; then sizes=(1024); classes=(100000); else sizes=(256 1024); classes=(100000 1000000 4000000); fi
for b in "${sizes[@]}"; do
  python3 -m margin_kernels.bench --device cuda --dtype bfloat16 --batch "$b" --dim 512 --classes "${classes[@]}" \
    --backends reference insightface triton cpp gemm-floor --repeat 10 \
    --json "$OUT/bench_b${b}.json" --plot "$OUT/bench_b${b}.png" 2>&1 | tee "$OUT/bench_b${b}.txt"
  python3 -m margin_kernels.bench --device cuda --dtype bfloat16 --batch "$b" --dim 512 --classes "${classes[@]}" \
    --margin none --backends reference torch-linear-ce triton cpp --repeat 10 \
    --json "$OUT/bench_nomargin_b${b}.json" 2>&1 | tee "$OUT/bench_nomargin_b${b}.txt"
done

#!/usr/bin/env bash
# Downloads the pure-Python wheels of the peer libraries the GPU benchmark puts
# beside ours (apple's cut-cross-entropy, Liger-Kernel), into benchmarks/peers/
# (not tracked). gpu_run.sh unpacks them onto PYTHONPATH without installing, so
# a GPU machine without network can run them: carry benchmarks/peers along.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p peers
python3 -m pip download --quiet --disable-pip-version-check --no-deps -d peers \
  "cut-cross-entropy==25.1.1" "liger-kernel==0.8.5"
ls peers

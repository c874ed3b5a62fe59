#!/usr/bin/env bash
# Installs margin_kernels (editable, C++ extension built against the torch that
# is already there) and what its tests and benchmarks need.
#
#   bash scripts/install.sh          # library + test dependencies
#   bash scripts/install.sh demo     # ... + scikit-learn and matplotlib (demo, plots)
#
# torch is installed only when none is importable, and then as torch==2.13.0
# (the CPU wheel on the project's machines); an existing torch, CPU or CUDA, is
# never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "install.sh: no torch found; installing torch==2.13.0" >&2
  "${PIP[@]}" torch==2.13.0
fi
"${PIP[@]}" numpy pytest pytest-xdist pybind11 ninja setuptools wheel
"$PY" -c "import triton" 2>/dev/null || "${PIP[@]}" triton
if [[ "${1:-}" == "demo" ]]; then
  "${PIP[@]}" scikit-learn matplotlib
fi
# Rebuild only when the sources, the build script or torch changed since the
# last build from this tree (a stamp under build/, which git ignores).
STAMP=build/.install-stamp
stamp=$("$PY" - <<'PY'
import hashlib, pathlib, torch
h = hashlib.sha256(torch.__version__.encode())
for p in sorted([*pathlib.Path("csrc").rglob("*"), pathlib.Path("setup.py"), pathlib.Path("pyproject.toml")]):
    if p.is_file():
        h.update(str(p).encode()); h.update(p.read_bytes())
print(h.hexdigest())
PY
)
# ... and only when the installed package is this tree's (imported from elsewhere than here)
installed=$(cd / && "$PY" -c "import margin_kernels._C, os; print(os.path.dirname(os.path.dirname(margin_kernels._C.__file__)))" 2>/dev/null || true)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$stamp" && "$installed" == "$PWD" ]]; then
  echo "install.sh: margin_kernels._C is current (sources unchanged since the last build); not rebuilding" >&2
else
  echo "install.sh: building margin_kernels._C ..." >&2
  "${PIP[@]}" --no-build-isolation --use-pep517 -e .
  mkdir -p build && echo "$stamp" > "$STAMP"
fi
"$PY" -c "import margin_kernels, margin_kernels.backends as b; print('margin_kernels', margin_kernels.__version__, '| cpp backend:', b.is_available('cpp'))"

"""benchmarks/gpu_run.sh first-look, rehearsed on the CPU at tiny sizes: every
step runs and the summary reports it, so time on a GPU is spent
measuring, not debugging the script."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import requires_cpp

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@requires_cpp
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_first_look_dry_run(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    steps = (tmp_path / "steps.txt").read_text()
    for step in ("large-C check: exit 0", "bench_margin: exit 0", "bench_plain: exit 0", "tests: exit 0",
                 "phase first-look done"):
        assert step in steps, steps
    assert "| triton | PASS" in summary and "| triton-split | PASS" in summary and "| cpp | PASS" in summary
    assert "reference" in summary and "insightface" in summary and "torch-linear-ce" in summary
    assert "cce runs on CUDA only" in summary  # a peer row is reported, not dropped
    assert "tests collected" in summary
    if any((ROOT / "benchmarks" / "peers").glob("*.whl")):  # fetched: the carried wheels import
        assert "peers importable (benchmarks/peers/*.whl): exit 0" in steps, (tmp_path / "peers.txt").read_text()

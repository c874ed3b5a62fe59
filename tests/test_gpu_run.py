"""benchmarks/gpu_run.sh, both phases rehearsed on the CPU at tiny sizes:
every step runs under its budget and the summary reports it (and a step cut
off by its budget is reported as such), so time on a GPU is spent measuring,
not debugging the script."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import requires_cpp

ROOT = Path(__file__).resolve().parents[1]


def dry_run(tmp_path, **env):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), **env)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (tmp_path / "steps.txt").read_text()


@pytest.mark.slow
@requires_cpp
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_first_look_dry_run(tmp_path):
    steps = dry_run(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    for step, budget in (("large-C check", 90), ("bench_margin", 75), ("bench_plain", 60)):
        assert re.search(rf"{step}: exit 0 in \d+ s \(budget {budget} s\)", steps), steps
    assert "phase first-look done" in steps and "tests:" not in steps  # the suite is a phase of its own
    assert "No step was cut off." in summary
    assert "| triton | PASS" in summary and "| triton-split | PASS" in summary and "| cpp | PASS" in summary
    assert "reference" in summary and "insightface" in summary and "torch-linear-ce" in summary
    assert "cce runs on CUDA only" in summary  # a peer row is reported, not dropped
    gpu = (tmp_path / "gpu.txt").read_text()
    assert "triton" in gpu and "nvcc:" in gpu and "ninja:" in gpu  # the machine, up front
    assert not [p for p in tmp_path.rglob("*") if p.suffix == ".whl" or "peers" in p.name and p.is_dir()]
    for name in ("large_c", "bench_margin", "bench_plain"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["complete"] is True
    if any((ROOT / "benchmarks" / "peers").glob("*.whl")):  # fetched: the carried wheels import
        assert "peers importable (benchmarks/peers/*.whl): exit 0" in steps, (tmp_path / "peers.txt").read_text()


@pytest.mark.slow
@requires_cpp
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_test_phase_dry_run(tmp_path):
    steps = dry_run(tmp_path, PHASE="tests")
    assert re.search(r"tests: exit 0 in \d+ s \(budget 480 s\)", steps) and "phase tests done" in steps
    assert "tests collected" in (tmp_path / "tests.txt").read_text()


@pytest.mark.slow
@requires_cpp
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_step_past_its_budget_is_cut_off_and_reported(tmp_path):
    """Budgets of a second: every step is cut off; the run goes on to its
    summary, which names them, and what each measured is left."""
    steps = dry_run(tmp_path, BUDGET_LARGE="1", BUDGET_MARGIN="1", BUDGET_PLAIN="1")
    for step in ("large-C check", "bench_margin", "bench_plain"):
        assert f"{step}: CUT OFF at its budget" in steps, steps
    summary = (tmp_path / "summary.md").read_text()
    assert "Cut off by their budgets: large-C check, bench_margin, bench_plain." in summary
    assert "(not run)" not in summary and summary.count("(cut off") == 2 and "(no backend finished" in summary
    assert "phase first-look done" in steps

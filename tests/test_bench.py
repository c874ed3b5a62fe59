"""The benchmark CLI: argument errors and a tiny end-to-end run."""
import json
import subprocess
import sys

import pytest

from margin_kernels import bench

from conftest import requires_cpp


def run_cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "margin_kernels.bench", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "0"], "--batch must be >= 1"),
        (["--classes", "100", "-5"], "--classes must all be >= 1"),
        (["--backends", "cudnn"], "unknown implementation 'cudnn'"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["--size", "huge"], "invalid choice: 'huge'"),
        (["--budget-gib", "0"], "--budget-gib must be > 0"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
    ],
)
def test_argument_errors_exit_nonzero_with_a_clear_message(args, message):
    proc = run_cli(*args, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr


@pytest.mark.slow
@requires_cpp
def test_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("--size", "tiny", "--backends", "reference", "cpp", "gemm-floor", "--repeat", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "implementation" in proc.stdout and "reference" in proc.stdout and "cpp" in proc.stdout
    data = json.loads(out.read_text())
    rows = data["results"]
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    cpp_rows = [r for r in rows if r["case"]["impl"] == "cpp"]
    assert all(r["time_ms"] > 0 and r["workspace_bytes"] is not None for r in cpp_rows)


def test_table_puts_the_baseline_and_ratios_side_by_side():
    case = lambda impl: bench.Case(impl, 8, 4, 1000)  # noqa: E731
    results = [
        bench.Result(case("reference"), times_ms=[10.0], workspace_bytes=400 * 2**20),
        bench.Result(case("cpp"), times_ms=[2.5], workspace_bytes=4 * 2**20),
        bench.Result(case("insightface"), status="oom", message="can't allocate"),
    ]
    table = bench.format_table(results)
    assert "4.00x" in table and "0.010" in table and "OOM" in table

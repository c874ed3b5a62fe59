"""Every Triton kernel and autotune config compiles for sm_80 and sm_90 (no GPU
needed), and bf16 tiles on Hopper use its tensor-core instruction, wgmma."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def aot_rows():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "margin_kernels.backends.triton_aot", "90", "80"],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_config_compiles(aot_rows):
    from margin_kernels.backends import triton_aot, triton_kernels

    configs = sum(len(triton_kernels._configs(kind, interpret=False)) for kind in triton_aot.KERNELS)
    assert configs == 5 + 4 + 4 + 4
    assert len(aot_rows) == configs * 2 * 2  # x archs x dtypes
    failed = [r for r in aot_rows if not r["ok"]]
    assert not failed, failed[:3]
    for r in aot_rows:
        print(json.dumps(r))


def test_hopper_bf16_uses_wgmma_without_spills(aot_rows):
    hopper = [r for r in aot_rows if r["arch"] == 90 and r["dtype"] == "bf16"]
    assert hopper and all(r["mma"] == "wgmma" and r["cp_async"] for r in hopper)
    measured = [r for r in hopper if "spill_bytes" in r]  # when a ptxas for the PTX is found
    assert all(r["spill_bytes"] == 0 for r in measured), [(r["config"], r["spill_bytes"]) for r in measured]
    ampere = [r for r in aot_rows if r["arch"] == 80 and r["dtype"] == "bf16"]
    assert all(r["mma"] == "mma.sync" for r in ampere)

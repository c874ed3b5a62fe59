"""The Triton kernels compile for sm_90 / sm_80 (no GPU needed): bf16 tiles on
Hopper use its tensor-core instruction, wgmma, without spills (with and
without sub-centers), and no pointer
offset into a [C, D] or [B, D] buffer is 32-bit (it would wrap past 2^31
elements: C > 4,194,304 classes at D = 512).

The default run compiles one config per kernel for sm_90; the full matrix of
configs, architectures and dtypes is ``slow``."""
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

AOT = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_aot.py"


def aot(*args):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, str(AOT), *args], capture_output=True, text=True, env=env)
    missing = re.search(r"No module named '([^']+)'", proc.stderr) if proc.returncode != 0 else None
    if missing and missing.group(1).split(".")[0] == "triton":  # a Triton build without its AOT compiler parts
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def check(rows):
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed[:3]
    narrow = [(r["kernel"], r["dtype"], r["class_index"], r["narrow_offsets"][:2]) for r in rows if r["narrow_offsets"]]
    assert not narrow, narrow
    ordered = [(r["kernel"], r["dtype"], r["ordered_atomics"]) for r in rows if r["ordered_atomics"]]
    assert not ordered, ordered  # every gradient sum is a relaxed atomic
    hopper = [r for r in rows if r["arch"] == 90 and r["dtype"] in ("bf16", "fp16") and r["kernel"].startswith(("fwd", "bwd"))]
    assert hopper and all(r["mma"] == "wgmma" and r["cp_async"] for r in hopper)
    measured = [r for r in hopper if "spill_bytes" in r]  # when a ptxas for the PTX is found
    assert all(r["spill_bytes"] == 0 for r in measured), [(r["config"], r["spill_bytes"]) for r in measured]
    ampere = [r for r in rows if r["arch"] == 80 and r["dtype"] == "bf16" and r["kernel"].startswith(("fwd", "bwd"))]
    assert all(r["mma"] == "mma.sync" for r in ampere)


def test_narrow_offsets_are_found():
    """The IR check sees a 32-bit row offset (what the kernels had before)."""
    sys.path.insert(0, str(AOT.parent))
    from triton_aot import narrow_offsets

    ir = """
    %a = tt.splat %W : !tt.ptr<bf16> -> tensor<64x1x!tt.ptr<bf16>> loc(#loc1)
    %b = tt.addptr %a, %rows : tensor<64x1x!tt.ptr<bf16>>, tensor<64x1xi32> loc(#loc2)
    %c = tt.addptr %b, %ks : tensor<64x1x!tt.ptr<bf16>>, tensor<64x1xi64> loc(#loc3)
    %d = tt.splat %LABELS : !tt.ptr<i64> -> tensor<64x!tt.ptr<i64>> loc(#loc4)
    %e = tt.addptr %d, %rows : tensor<64x!tt.ptr<i64>>, tensor<64xi32> loc(#loc5)
    """
    assert narrow_offsets(ir, {"W"}) == ["%b = tt.addptr %a, %rows : tensor<64x1x!tt.ptr<bf16>>, tensor<64x1xi32>"]


def test_one_config_per_kernel_compiles_for_hopper_with_64bit_offsets():
    rows = aot("--subset", "90", "--dtypes", "bf16", "fp16", "fp32")
    assert {r["kernel"] for r in rows} == {"fwd", "bwd", "bwd_dw", "bwd_dx", "norm", "project"}
    assert {r["kernel"] for r in rows if r.get("subcenters") == 3} == {"fwd", "bwd"}
    check(rows)


@pytest.mark.slow
def test_every_kernel_config_compiles():
    from margin_kernels.backends.triton_kernels import autotune

    # bf16 on sm_90 and sm_80, fp16 on sm_90 (fp32, and the fp16 index variants: the subset above)
    rows = aot("90", "80", "--dtypes", "bf16") + aot("90", "--dtypes", "fp16")
    configs = sum(len(autotune.candidates(kind, interpret=False)) for kind in ("fwd", "bwd", "bwd_dw", "bwd_dx"))
    assert configs == 5 + 3 + 4 + 3
    with_subcenters = sum(len(autotune.candidates(kind, interpret=False, subcenters=True)) for kind in ("fwd", "bwd"))
    assert with_subcenters == 3 + 2
    # (+ norm, project) x (sm_90 bf16, sm_80 bf16, sm_90 fp16), with the class index
    assert len(rows) == (configs + with_subcenters + 2) * 3
    assert sum(r.get("subcenters") == 3 for r in rows) == with_subcenters * 3
    assert {(r["arch"], r["dtype"]) for r in rows} == {(90, "bf16"), (80, "bf16"), (90, "fp16")}
    check(rows)
    for r in rows:
        print(json.dumps(r))

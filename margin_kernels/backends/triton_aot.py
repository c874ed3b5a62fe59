"""Compile the Triton kernels ahead of time for a GPU architecture, without a GPU.

    TRITON_INTERPRET=0 python3 -m margin_kernels.backends.triton_aot 90 80

prints, per kernel x autotune config x architecture x dtype, whether it compiled
to a cubin, the matrix instruction family in the PTX (wgmma on Hopper, mma.sync
before), whether loads go through cp.async, and registers / spill bytes when a
ptxas for that PTX is found. The tests run it to catch kernels that interpret
on the CPU but do not compile for a GPU.

Arguments are specialized as Triton's JIT does at launch for the usual shapes
(pointers 16-byte aligned; D and the row strides divisible by 16, as for D=512).
Without those hints the loads cannot be vectorized and the report shows spills
that a real launch would not have.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_kernels as K

_POINTERS = {"W_INV": "*fp32", "LABELS": "*i64", "TARGET": "*fp32", "CLASS_INDEX": "*i64", "PART_MAX": "*fp32",
             "PART_SUM": "*fp32", "SLOPE": "*fp32", "LSE": "*fp32", "GRAD": "*fp32", "DX": "*fp32", "DW": "*fp32"}
_SCALARS = {"B": "i32", "C": "i32", "D": "i32", "stride_x": "i32", "stride_w": "i32", "scale": "fp32"}
_DIVISIBLE_BY_16 = ("D", "stride_x", "stride_w")
KERNELS = {"fwd": K.lse_forward_kernel, "bwd": K.lse_backward_kernel, "bwd_dw": K.lse_backward_dw_kernel,
           "bwd_dx": K.lse_backward_dx_kernel}


def _ptxas() -> str | None:
    root = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(root, name)
        if os.path.exists(path):
            return path
    return None


def _resources(ptx: str, arch: int) -> dict:
    ptxas = _ptxas()
    if ptxas is None:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", proc.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    return {"registers": int(regs[0]), "spill_bytes": int(spills[0])} if regs and spills else {}


def compile_all(archs: list[int]) -> list[dict]:
    rows = []
    for kind, kernel in KERNELS.items():
        fn = kernel.fn
        for cfg in K._configs(kind, interpret=False):
            for arch in archs:
                for dtype in ("bf16", "fp32"):
                    types = {"X": f"*{dtype}", "W": f"*{dtype}", **_POINTERS, **_SCALARS}
                    signature = {a: types.get(a, "constexpr") for a in fn.arg_names}
                    consts = {"HAS_INDEX": True, "UPCAST": False, "IEEE": dtype == "fp32", **cfg.kwargs}
                    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                             if types.get(a, "").startswith("*") or a in _DIVISIBLE_BY_16}
                    row = {"kernel": kind, "config": cfg.kwargs, "warps": cfg.num_warps, "stages": cfg.num_stages,
                           "arch": arch, "dtype": dtype}
                    try:
                        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                                           target=GPUTarget("cuda", arch, 32),
                                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
                        ptx = k.asm["ptx"]
                        row.update(ok="cubin" in k.asm, smem=k.metadata.shared,
                                   mma="wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "fma",
                                   cp_async="cp.async" in ptx,
                                   **_resources(ptx, arch))
                    except Exception as exc:  # report, do not stop: the table is the point
                        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                    rows.append(row)
    return rows


if __name__ == "__main__":
    if K.INTERPRET:
        sys.exit("run with TRITON_INTERPRET=0: the interpreter replaces the kernels")
    for row in compile_all([int(a) for a in sys.argv[1:]] or [90, 80]):
        print(json.dumps(row))

"""Compile the Triton kernels ahead of time for a GPU architecture, without a GPU.

    TRITON_INTERPRET=0 python3 benchmarks/triton_aot.py 90 80            # every config
    TRITON_INTERPRET=0 python3 benchmarks/triton_aot.py --subset 90      # one config per kernel

prints one JSON line per kernel x autotune config x architecture x dtype x
(with / without a class index; the forward's and atomic backward's sub-center
candidates with 3 sub-centers): whether it compiled to a cubin, the matrix
instruction family in the PTX (wgmma on Hopper, mma.sync before), whether loads
go through cp.async, registers / spill bytes when a ptxas for that PTX is found,
and ``narrow_offsets``: the pointer additions into a [C, D] or [B, D] buffer
whose offset is 32-bit in the Triton IR (each one a wrap past 2^31 elements:
C > 4,194,304 classes at D = 512). The tests run it to catch kernels that
interpret on the CPU but do not compile for a GPU, or index with int32.

Arguments are specialized as Triton's JIT does at launch for the usual shapes
(pointers 16-byte aligned; D and the row strides divisible by 16, as for D=512).
Without those hints the loads cannot be vectorized and the report shows spills
that a real launch would not have.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from margin_kernels.backends import triton_kernels as K
from margin_kernels.backends.triton_kernels.autotune import candidates

_POINTERS = {"W_INV": "*fp32", "LABELS": "*i64", "TARGET": "*fp32", "CLASS_INDEX": "*i64", "PART_MAX": "*fp32",
             "PART_SUM": "*fp32", "HARD": "*fp32", "LSE": "*fp32", "GRAD": "*fp32", "DX": "*fp32", "DW": "*fp32",
             "G": "*fp32"}
_SCALARS = {"B": "i32", "C": "i32", "D": "i32", "stride_x": "i32", "stride_w": "i32", "scale": "fp32",
            "B_BUCKET": "i32", "C_BUCKET": "i32", "eps": "fp32"}
_DIVISIBLE_BY_16 = ("D", "stride_x", "stride_w")
# Buffers with a row per class or per batch row, D wide (the norm kernel's OUT is [C]).
WIDE_BUFFERS = {"X", "W", "DX", "DW", "G"}
TILED = {"fwd": K.lse_forward_kernel, "bwd": K.lse_backward_kernel, "bwd_dw": K.lse_backward_dw_kernel,
         "bwd_dx": K.lse_backward_dx_kernel}
SUBCENTER_KERNELS = ("fwd", "bwd")
SMALL = {"norm": (K.row_inv_norm_kernel, {"BLOCK_R": 64, "BLOCK_K": 64}),
         "project": (K.project_rows_kernel, {"BLOCK_D": 512})}


def ordered_atomics(ptx: str) -> list[str]:
    """Atomic instructions (atom / red) that are not relaxed: a gradient sum
    needs no memory ordering, and acq_rel costs fences."""
    return [op for op in re.findall(r"\b(?:atom|red)\.[\w.]+", ptx) if ".relaxed" not in op]


def narrow_offsets(ttir: str, buffers: set[str]) -> list[str]:
    """The ``tt.addptr`` ops of a kernel's Triton IR whose pointer derives from
    one of ``buffers`` (argument names) and whose offset is 32-bit."""
    derived = {f"%{b}" for b in buffers}
    narrow = []
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w.]+)(?::\d+)? = ([\w.]+) (.*)", line)
        if not m:
            continue
        result, op, rest = m.groups()
        operands = re.findall(r"%[\w.]+", rest.split(" : ")[0])
        if not any(o in derived for o in operands):
            continue
        if "!tt.ptr" in rest.split(" : ")[-1]:
            derived.add(result)
        if op == "tt.addptr" and operands[0] in derived:
            offset_type = rest.split(" : ")[-1].split(", ")[-1]
            if re.search(r"\bi32\b|xi32>", offset_type):
                narrow.append(line.strip().split(" loc(")[0])
    return narrow


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


def _jobs(subset: bool):
    """(kind, config number, constexprs of the config, num_warps, num_stages,
    sub-centers): each config with a class index, hard negatives, and 1 or
    (the sub-center candidates of the kernels that take them) 3 sub-centers."""
    for kind in TILED:
        configs = candidates(kind, interpret=False)
        for i, cfg in enumerate(configs[:1] if subset else configs):
            yield kind, i, cfg.kwargs, cfg.num_warps, cfg.num_stages, 1
        if kind in SUBCENTER_KERNELS:
            configs = candidates(kind, interpret=False, subcenters=True)
            for i, cfg in enumerate(configs[:1] if subset else configs):
                yield kind, i, cfg.kwargs, cfg.num_warps, cfg.num_stages, 3
    for kind, (_, meta) in SMALL.items():
        yield kind, 0, meta, 4, 1, 1


def _compile_job(job: tuple) -> dict:
    kind, _, meta, warps, stages, subcenters, arch, dtype, has_index = job
    kernel = TILED[kind] if kind in TILED else SMALL[kind][0]
    return compile_one(kind, kernel, meta, warps, stages, arch, dtype, has_index, subcenters)


def compile_one(kind, kernel, meta, warps, stages, arch: int, dtype: str, has_index: bool,
                subcenters: int = 1) -> dict:
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel  # the JITFunction
    types = {"X": f"*{dtype}", "W": f"*{dtype}", **_POINTERS, **_SCALARS}
    if kind == "project":
        types["OUT"] = f"*{dtype}"
    elif kind == "norm":
        types["OUT"] = "*fp32"
    signature = {a: types.get(a, "constexpr") for a in fn.arg_names}
    # the variant with a class index also takes CurricularFace's hard negatives
    consts = {"HAS_INDEX": has_index, "HAS_HARD": has_index, "SUBCENTERS": subcenters, "UPCAST": False,
              "IEEE": dtype == "fp32", "SCALE": dtype == "fp16", "WITH_DW": True, **meta}
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if types.get(a, "").startswith("*") or a in _DIVISIBLE_BY_16}
    row = {"kernel": kind, "config": meta, "warps": warps, "stages": stages, "arch": arch, "dtype": dtype,
           "class_index": has_index, "hard": has_index}
    if "SUBCENTERS" in fn.arg_names:
        row["subcenters"] = subcenters
    try:
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
        ptx = k.asm["ptx"]
        buffers = WIDE_BUFFERS | ({"OUT"} if kind == "project" else set())
        row.update(ok="cubin" in k.asm, smem=k.metadata.shared,
                   mma="wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "fma",
                   cp_async="cp.async" in ptx, narrow_offsets=narrow_offsets(k.asm["ttir"], buffers),
                   ordered_atomics=sorted(set(ordered_atomics(ptx))),
                   **_resources(ptx, arch))
    except Exception as exc:  # report, do not stop: the table is the point
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return row


def compile_all(archs: list[int], subset: bool = False, dtypes=("bf16", "fp32"), jobs: int = 1) -> list[dict]:
    """The subset compiles both index variants of each kernel (their offset
    math differs); the full matrix every config with the index (the costlier
    one). ``jobs`` > 1 compiles in that many processes (rows keep their order)."""
    work = [(*job, arch, dtype, has_index) for job in _jobs(subset) for arch in archs for dtype in dtypes
            for has_index in ((False, True) if subset and job[-1] == 1 else (True,))]
    if jobs <= 1:
        return [_compile_job(w) for w in work]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return pool.map(_compile_job, work, chunksize=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="*", type=int, default=[90, 80], help="compute capabilities, e.g. 90 80")
    parser.add_argument("--subset", action="store_true", help="the first autotune config of each kernel only")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: one a core)")
    args = parser.parse_args(argv)
    if K.INTERPRET:
        sys.exit("run with TRITON_INTERPRET=0: the interpreter replaces the kernels")
    for row in compile_all(args.archs, args.subset, tuple(args.dtypes), args.jobs):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

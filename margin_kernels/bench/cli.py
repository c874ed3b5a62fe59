"""Benchmark: fwd+bwd time and peak extra memory of each backend against the
naive baselines, side by side in one run.

    python -m margin_kernels.bench                       # default size, this device
    python -m margin_kernels.bench --size tiny
    python -m margin_kernels.bench --classes 50000 200000 --batch 512 --dim 256
    python -m margin_kernels.bench --plot bench.png --json bench.json
    python -m margin_kernels.bench --scale --budget-gib 2  # most classes per budget

Every measurement runs in a fresh subprocess so that peak memory is its own:
on CPU, the peak resident set (VmHWM, reset through /proc/self/clear_refs after
the inputs exist) minus the resident set at that point; on CUDA,
``max_memory_allocated`` minus the allocation at that point. "Workspace" then
subtracts the gradient outputs (dx, dW), which any implementation must return;
"total" (scale mode) counts everything the step adds beyond the process's
baseline, inputs and weights included.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from .memory import mem_available
from .report import (Progress, format_conclusion, format_legend, format_overheads, format_scale, format_table, mib,
                     plot, useful_tflops)
from .steps import BASELINES, CPP_GEMMS, FLOOR, FLOORS, INSIGHTFACE_MARGINS, PEERS, TRITON_SPLIT, margin_names
from .worker import Case, Result, run_case, spawn

SIZES = {
    "tiny": dict(batch=64, dim=32, classes=[1_000, 4_000]),
    "default": dict(batch=512, dim=128, classes=[10_000, 40_000, 100_000]),
    "large": dict(batch=512, dim=256, classes=[50_000, 200_000, 1_000_000]),
}
MARGINS = margin_names()
DTYPES = ("float32", "bfloat16", "float16")


def available_impls(device: str, margin: str) -> list[str]:
    from margin_kernels import backends

    impls = ["reference"] + (["insightface"] if margin in INSIGHTFACE_MARGINS else [])
    if margin == "none":
        impls.append("torch-linear-ce")
    fused = [b for b in ("cpp", "triton") if backends.is_available(b) and _backend_runs_on(b, device)]
    split = [TRITON_SPLIT] if "triton" in fused else []
    return impls + fused + split + [FLOOR] + ([CPP_GEMMS] if "cpp" in fused else [])


def _backend_runs_on(name: str, device: str) -> bool:
    from margin_kernels import backends

    if name == "cpp":
        return device == "cpu" or backends.load("cpp").runs_on_cuda()
    return device.startswith("cuda")  # triton


def _payload(results: list[Result]) -> list[dict]:
    return [dict(asdict(r), time_ms=r.time_ms, tflops=useful_tflops(r) if r.time_ms else None) for r in results]


def write_json(path: str, title: str, payload: list[dict], complete: bool) -> None:
    """The measurements so far; ``complete`` is False while the sweep runs, so
    that a sweep cut off by a time limit leaves every row it finished."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(title=title, complete=complete, results=payload), f, indent=1)
    os.replace(tmp, path)


def run_sweep(args, title: str = "") -> list[Result]:
    impls = args.backends or available_impls(args.device, args.margin)
    cases = [
        Case(impl, args.batch, args.dim, c, args.dtype, args.margin, args.device, args.repeat, args.mem_limit_bytes)
        for c in args.classes
        for impl in impls
    ]
    progress = Progress(len(cases))
    results = []
    for case in cases:
        res = spawn(case, args.timeout)
        results.append(res)
        shown = f"{res.time_ms:.0f} ms" if res.status == "ok" else res.status
        progress.update(f"{case.impl} C={case.classes}: {shown}")
        if args.json:
            write_json(args.json, title, _payload(results), complete=False)
    return results


def scale_search(args) -> list[tuple[str, int, Result | None]]:
    """Most classes each implementation fits in ``--budget-gib`` (total memory of the
    step: inputs, weights, their gradients and workspace): doubling, then bisection."""
    budget = int(args.budget_gib * 2**30)
    impls = [i for i in (args.backends or available_impls(args.device, args.margin)) if i not in FLOORS]
    found = []
    for impl in impls:

        def fits(c: int) -> Result | None:
            case = Case(impl, args.batch, args.dim, c, args.dtype, args.margin, args.device, 1,
                        args.mem_limit_bytes)
            res = spawn(case, args.timeout)
            ok = res.status == "ok" and res.total_bytes is not None and res.total_bytes <= budget
            sys.stderr.write(f"  {impl:<16} C={c:>12,}: {mib(res.total_bytes)} MiB {'fits' if ok else 'does not fit'}\n")
            return res if ok else None

        lo, lo_res, hi = 0, None, args.scale_start
        while (res := fits(hi)) is not None:
            lo, lo_res, hi = hi, res, hi * 2
        for _ in range(args.bisect_steps):
            mid = (lo + hi) // 2
            if mid in (lo, hi):
                break
            if (res := fits(mid)) is not None:
                lo, lo_res = mid, res
            else:
                hi = mid
        found.append((impl, lo, lo_res))
    return found


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m margin_kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="preset for --batch/--dim/--classes")
    p.add_argument("--classes", type=int, nargs="+", help="numbers of classes C to sweep")
    p.add_argument("--batch", type=int, help="batch size B")
    p.add_argument("--dim", type=int, help="embedding size D")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--margin", choices=MARGINS, default="arcface",
                   help="a margin family's short name; 'none' is plain softmax and adds torch's "
                   "linear_cross_entropy, 'subcenter' is ArcFace with 3 sub-centers per class (a [3C, D] weight); "
                   f"all but {', '.join(INSIGHTFACE_MARGINS)} run against the reference alone")
    p.add_argument("--backends", nargs="+", help=f"implementations to run (default: all available; baselines: {BASELINES}; "
                   f"with --margin none on CUDA also the peers {PEERS})")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions after the warm-up (median reported)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", metavar="PATH", help="write all measurements to PATH")
    p.add_argument("--plot", metavar="PNG", help="draw time and memory against C to PNG (needs matplotlib)")
    p.add_argument("--scale", action="store_true", help="find the most classes each implementation fits in --budget-gib")
    p.add_argument("--budget-gib", type=float, default=1.0)
    p.add_argument("--scale-start", type=int, default=8192, help="first C of the scale search")
    p.add_argument("--bisect-steps", type=int, default=5)
    p.add_argument("--mem-limit-gib", type=float, default=None,
                   help="cap each CPU worker's memory (default: 80%% of available)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    preset = SIZES[args.size]
    for name in ("batch", "dim", "classes"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    for name in ("batch", "dim", "repeat"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(c < 1 for c in args.classes):
        p.error(f"--classes must all be >= 1, got {args.classes}")
    if args.budget_gib <= 0:
        p.error("--budget-gib must be > 0")
    known = set(BASELINES) | set(FLOORS) | set(PEERS) | {"cpp", "triton", TRITON_SPLIT}
    for b in args.backends or []:
        if b not in known:
            p.error(f"unknown implementation {b!r}; choose from {sorted(known)}")
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if args.device not in ("cpu",) and not args.device.startswith("cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    limit = args.mem_limit_gib * 2**30 if args.mem_limit_gib else 0.8 * mem_available()
    args.mem_limit_bytes = int(limit)
    return args


def _machine() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        res = run_case(Case(**json.loads(args.worker)))
        out = asdict(res)
        out.pop("case")
        print(json.dumps(out))
        return 0
    title = (f"margin_kernels bench: B={args.batch} D={args.dim} {args.dtype} margin={args.margin} "
             f"on {args.device} ({_machine()})")
    print(title, flush=True)
    if args.scale:
        found = scale_search(args)
        print(format_scale(found, args.budget_gib))
        payload = [dict(impl=i, max_classes=c) for i, c, _ in found]
    else:
        results = run_sweep(args, title)
        impls_run = [r.case.impl for r in results]
        naive = "reference" if "reference" in impls_run else impls_run[0]
        print(format_table(results, naive=naive))
        print(format_legend(results, naive))
        overheads = format_overheads(results)
        if overheads:
            print(overheads)
        conclusion = format_conclusion(results, naive)
        if conclusion:
            print(conclusion)
        payload = _payload(results)
        if args.plot:
            plot(results, args.plot, title)
            print(f"plot written to {args.plot}")
    if args.json:
        write_json(args.json, title, payload, complete=True)
        print(f"measurements written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

SIZES = {
    "tiny": dict(batch=64, dim=32, classes=[1_000, 4_000]),
    "default": dict(batch=512, dim=128, classes=[10_000, 40_000, 100_000]),
    "large": dict(batch=512, dim=256, classes=[50_000, 200_000, 1_000_000]),
}
MARGINS = ("arcface", "cosface", "none")
DTYPES = ("float32", "bfloat16", "float16")
BASELINES = ("reference", "insightface", "torch-linear-ce")
FLOOR = "gemm-floor"


@dataclass
class Case:
    impl: str
    batch: int
    dim: int
    classes: int
    dtype: str = "float32"
    margin: str = "arcface"
    device: str = "cpu"
    repeat: int = 3
    mem_limit_bytes: int = 0


@dataclass
class Result:
    case: Case
    status: str = "ok"  # ok | oom | error | skipped
    times_ms: list[float] = field(default_factory=list)
    workspace_bytes: int | None = None
    total_bytes: int | None = None
    message: str = ""

    @property
    def time_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None


# --------------------------------------------------------------------------- steps


def _margin_spec(name: str):
    import margin_kernels as mk

    return {"arcface": mk.ArcFace(), "cosface": mk.CosFace(), "none": mk.NormSoftmax()}[name]


def _insightface_step(x, w, y, margin):
    """insightface's arcface_torch recipe, from its published algorithm: normalize,
    linear, clamp, the margin applied in place under no_grad on the whole logits
    matrix (arccos / cos of every entry for the angular margin), scale, softmax CE."""
    import torch
    import torch.nn.functional as F

    m1, m2, m3 = margin.fixed_triple()
    logits = F.linear(F.normalize(x.float()), F.normalize(w.float())).clamp(-1, 1)
    rows = torch.arange(y.shape[0], device=y.device)
    with torch.no_grad():
        if m2 > 0:
            logits.arccos_()
            logits[rows, y] += m2
            logits.cos_()
        elif m3 > 0:
            logits[rows, y] -= m3
    loss = F.cross_entropy(logits * margin.s, y)
    loss.backward()


def _make_step(impl: str, margin_name: str, x, w, y):
    import torch
    import torch.nn.functional as F

    import margin_kernels as mk

    margin = _margin_spec(margin_name)
    if impl in ("reference", "cpp", "triton"):

        def step():
            mk.margin_cross_entropy(x, w, y, margin, backend=impl).backward()

    elif impl == "insightface":

        def step():
            _insightface_step(x, w, y, margin)

    elif impl == "torch-linear-ce":

        def step():
            F.linear_cross_entropy(x, w, y).backward()

    elif impl == FLOOR:
        dz = torch.randn(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)

        def step():  # the three GEMMs any exact fused loss must do
            with torch.no_grad():
                x @ w.t()
                dz @ w
                dz.t() @ x

    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return step


# --------------------------------------------------------------------------- worker


def _rss_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _warm_up(case: Case, dtype, device) -> None:
    """Load libraries and the custom-op machinery on a tiny problem, through both
    the single-pass and the class-blocked path, so that one-time imports (about
    140 MiB of Python modules on the first torch.ops call) stay out of the
    measured peak."""
    import torch

    import margin_kernels as mk

    x = torch.randn(8, case.dim, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(16, case.dim, dtype=dtype, device=device, requires_grad=True)
    y = torch.arange(8, device=device)
    _make_step(case.impl, case.margin, x, w, y)()
    if case.impl in ("cpp", "triton"):
        mk.margin_cross_entropy(x, w, y, _margin_spec(case.margin), backend=case.impl, reduction="none").sum().backward()


def run_case(case: Case) -> Result:
    """Measure one case in this process (call it in a fresh one)."""
    import torch

    if case.mem_limit_bytes and case.device == "cpu":
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (case.mem_limit_bytes, case.mem_limit_bytes))
    dtype = getattr(torch, case.dtype)
    device = torch.device(case.device)
    result = Result(case)
    try:
        _warm_up(case, dtype, device)

        base_rss = _rss_status("VmRSS")
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(case.batch, case.dim, generator=g, dtype=dtype).to(device).requires_grad_(True)
        w = torch.randn(case.classes, case.dim, generator=g, dtype=dtype).to(device).requires_grad_(True)
        y = torch.randint(0, case.classes, (case.batch,), generator=g).to(device)
        step = _make_step(case.impl, case.margin, x, w, y)
        grad_bytes = (x.numel() + w.numel()) * x.element_size()
        input_bytes = grad_bytes

        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - before
        else:
            before = _rss_status("VmRSS")
            if not _reset_peak():
                before = _rss_status("VmHWM")
            step()
            extra = _rss_status("VmHWM") - before
            before -= base_rss  # for the total: what the inputs added
        if case.impl != FLOOR:
            result.workspace_bytes = max(extra - grad_bytes, 0)
            result.total_bytes = extra + (before if device.type == "cpu" else input_bytes)
        for _ in range(case.repeat):
            x.grad = w.grad = None
            _sync(case.device)
            t0 = time.perf_counter()
            step()
            _sync(case.device)
            result.times_ms.append(1e3 * (time.perf_counter() - t0))
    except (RuntimeError, MemoryError) as exc:
        text = str(exc)
        oom = isinstance(exc, MemoryError) or "out of memory" in text.lower() or "can't allocate" in text.lower()
        result.status = "oom" if oom else "error"
        result.message = text.splitlines()[0][:200] if text else type(exc).__name__
        tried = re.search(r"(?:tried to allocate|allocate) ([\d.]+ ?\w*B|\d+ bytes)", text)
        if oom:
            result.message = f"out of memory (allocating {tried.group(1)})" if tried else "out of memory"
    return result


def _spawn(case: Case, timeout: float) -> Result:
    cmd = [sys.executable, "-m", "margin_kernels.bench", "--worker", json.dumps(asdict(case))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result(case, status="error", message=f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            data = json.loads(line)
            data["case"] = case
            return Result(**data)
    if proc.returncode < 0 or "MemoryError" in proc.stderr or "Killed" in proc.stderr:
        return Result(case, status="oom", message=f"worker died (signal {-proc.returncode})")
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return Result(case, status="error", message=tail[:200])


# --------------------------------------------------------------------------- driver


def available_impls(device: str, margin: str) -> list[str]:
    from margin_kernels import backends

    impls = ["reference", "insightface"]
    if margin == "none":
        impls.append("torch-linear-ce")
    impls += [b for b in ("cpp", "triton") if backends.is_available(b) and _backend_runs_on(b, device)]
    return impls + [FLOOR]


def _backend_runs_on(name: str, device: str) -> bool:
    from margin_kernels import backends

    if name == "cpp":
        return device == "cpu" or backends.load("cpp").runs_on_cuda()
    return device.startswith("cuda")  # triton


class Progress:
    """A one-line progress bar on stderr (plain lines when not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, label: str) -> None:
        self.done += 1
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self.t0
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.0f}s  {label}"
        sys.stderr.write(("\r" + line.ljust(100)) if self.tty else line + "\n")
        if self.tty and self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def run_sweep(args) -> list[Result]:
    impls = args.backends or available_impls(args.device, args.margin)
    cases = [
        Case(impl, args.batch, args.dim, c, args.dtype, args.margin, args.device, args.repeat, args.mem_limit_bytes)
        for c in args.classes
        for impl in impls
    ]
    progress = Progress(len(cases))
    results = []
    for case in cases:
        res = _spawn(case, args.timeout)
        results.append(res)
        shown = f"{res.time_ms:.0f} ms" if res.status == "ok" else res.status
        progress.update(f"{case.impl} C={case.classes}: {shown}")
    return results


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def useful_tflops(r: Result) -> float:
    """6 B D C useful FLOPs of a fwd+bwd (three B x D x C GEMMs) over the time."""
    c = r.case
    return 6 * c.batch * c.dim * c.classes / (r.time_ms * 1e-3) / 1e12


def format_table(results: list[Result], naive: str = "reference") -> str:
    """One row per (C, implementation); ratios against the naive baseline of the same C."""
    head = (f"{'classes':>10} {'implementation':<16} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'speedup':>8} "
            f"{'workspace MiB':>14} {'/ naive':>8}")
    lines = [head, "-" * len(head)]
    by_c: dict[int, list[Result]] = {}
    for r in results:
        by_c.setdefault(r.case.classes, []).append(r)
    for c, rows in by_c.items():
        base = next((r for r in rows if r.case.impl == naive and r.status == "ok"), None)
        for r in rows:
            if r.status != "ok":
                lines.append(f"{c:>10,} {r.case.impl:<16} {r.status.upper():>11} {'':>8} {'':>8} {'':>14} {'':>8}  "
                             f"{r.message[:60]}")
                continue
            speed = f"{base.time_ms / r.time_ms:.2f}x" if base else "n/a"
            if r.workspace_bytes is None:
                mem, ratio = "-", ""
            else:
                mem = _mib(r.workspace_bytes)
                ratio = f"{r.workspace_bytes / base.workspace_bytes:.3f}" if base and base.workspace_bytes else "n/a"
            lines.append(f"{c:>10,} {r.case.impl:<16} {r.time_ms:>11,.1f} {useful_tflops(r):>8.3f} {speed:>8} "
                         f"{mem:>14} {ratio:>8}")
    return "\n".join(lines)


def plot(results: list[Result], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[demo]' (or pip install matplotlib)") from exc
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    impls = list(dict.fromkeys(r.case.impl for r in results))
    for impl in impls:
        rows = sorted((r for r in results if r.case.impl == impl), key=lambda r: r.case.classes)
        ok = [r for r in rows if r.status == "ok"]
        failed = [r for r in rows if r.status == "oom"]
        (line,) = ax_t.plot([r.case.classes for r in ok], [r.time_ms for r in ok], marker="o", label=impl)
        mem = [r for r in ok if r.workspace_bytes]
        if mem:
            ax_m.plot([r.case.classes for r in mem], [r.workspace_bytes / 2**20 for r in mem], marker="o",
                      color=line.get_color(), label=impl)
        for ax in (ax_t, ax_m):
            for r in failed:
                ax.axvline(r.case.classes, color=line.get_color(), ls=":", lw=1)
                ax.annotate(f"{impl} OOM", (r.case.classes, 0.95), xycoords=("data", "axes fraction"),
                            rotation=90, fontsize=7, color=line.get_color(), va="top")
    for ax, label in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "peak workspace (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of classes C")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def scale_search(args) -> list[tuple[str, int, Result | None]]:
    """Most classes each implementation fits in ``--budget-gib`` (total memory of the
    step: inputs, weights, their gradients and workspace): doubling, then bisection."""
    budget = int(args.budget_gib * 2**30)
    impls = [i for i in (args.backends or available_impls(args.device, args.margin)) if i != FLOOR]
    found = []
    for impl in impls:

        def fits(c: int) -> Result | None:
            case = Case(impl, args.batch, args.dim, c, args.dtype, args.margin, args.device, 1,
                        args.mem_limit_bytes)
            res = _spawn(case, args.timeout)
            ok = res.status == "ok" and res.total_bytes is not None and res.total_bytes <= budget
            sys.stderr.write(f"  {impl:<16} C={c:>12,}: {_mib(res.total_bytes)} MiB {'fits' if ok else 'does not fit'}\n")
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


def format_scale(found, budget_gib: float, naive: str = "reference") -> str:
    base = next((c for impl, c, _ in found if impl == naive), 0)
    head = f"{'implementation':<16} {'max classes':>14} {'/ naive':>8}   (budget {budget_gib:g} GiB)"
    lines = [head, "-" * len(head)]
    for impl, c, _ in found:
        ratio = f"{c / base:.1f}x" if base else "n/a"
        lines.append(f"{impl:<16} {c:>14,} {ratio:>8}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m margin_kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="preset for --batch/--dim/--classes")
    p.add_argument("--classes", type=int, nargs="+", help="numbers of classes C to sweep")
    p.add_argument("--batch", type=int, help="batch size B")
    p.add_argument("--dim", type=int, help="embedding size D")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--margin", choices=MARGINS, default="arcface", help="'none' adds torch's linear_cross_entropy")
    p.add_argument("--backends", nargs="+", help=f"implementations to run (default: all available; baselines: {BASELINES})")
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
    known = set(BASELINES) | {FLOOR, "cpp", "triton"}
    for b in args.backends or []:
        if b not in known:
            p.error(f"unknown implementation {b!r}; choose from {sorted(known)}")
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if args.device not in ("cpu",) and not args.device.startswith("cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    limit = args.mem_limit_gib * 2**30 if args.mem_limit_gib else 0.8 * _mem_available()
    args.mem_limit_bytes = int(limit)
    return args


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


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
        results = run_sweep(args)
        print(format_table(results))
        print("speedup = naive time / time; TFLOP/s counts 6 B D C useful FLOPs; workspace = peak memory beyond "
              f"inputs and gradient outputs; {FLOOR} = the three bare GEMMs (time floor).")
        payload = [dict(asdict(r), time_ms=r.time_ms, tflops=useful_tflops(r) if r.time_ms else None)
                   for r in results]
        if args.plot:
            plot(results, args.plot, title)
            print(f"plot written to {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(title=title, results=payload), f, indent=1)
        print(f"measurements written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

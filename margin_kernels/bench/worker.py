"""One measurement (time and peak memory of one implementation at one size),
run in a fresh subprocess so that its peak memory is its own."""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from .memory import reset_peak, rss_status
from ..backends import SINGLE_PASS_ENV
from .steps import FLOORS, make_step, weight_rows


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


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _warm_up(case: Case, dtype, device) -> None:
    """Load libraries and the custom-op machinery on a tiny problem, so that
    one-time imports (about 140 MiB of Python modules on the first torch.ops
    call) stay out of the measured CPU peak: for ``cpp`` through both the
    single-pass and the class-blocked path. Nothing on a GPU: there the first
    step at the measured shape (``run_case``) is the warm-up, so that only the
    kernels and autotune keys the timed steps use are compiled and tuned (a tiny
    problem tunes a bucket of B and C of its own), and torch.cuda's peak does
    not see imports."""
    if device.type == "cuda":
        return
    import torch

    x = torch.randn(8, case.dim, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(weight_rows(case.margin, 16), case.dim, dtype=dtype, device=device, requires_grad=True)
    y = torch.arange(8, device=device)
    make_step(case.impl, case.margin, x, w, y)()
    if case.impl == "cpp":  # the step again, with the shortcut off (the steps read the default)
        previous = os.environ.get(SINGLE_PASS_ENV)
        os.environ[SINGLE_PASS_ENV] = "0"
        try:
            make_step(case.impl, case.margin, x, w, y)()
        finally:
            if previous is None:
                del os.environ[SINGLE_PASS_ENV]
            else:
                os.environ[SINGLE_PASS_ENV] = previous


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

        base_rss = rss_status("VmRSS")
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(case.batch, case.dim, generator=g, dtype=dtype).to(device).requires_grad_(True)
        w = torch.randn(weight_rows(case.margin, case.classes), case.dim, generator=g, dtype=dtype).to(device)
        w.requires_grad_(True)
        y = torch.randint(0, case.classes, (case.batch,), generator=g).to(device)
        step = make_step(case.impl, case.margin, x, w, y)
        grad_bytes = (x.numel() + w.numel()) * x.element_size()
        input_bytes = grad_bytes

        if device.type == "cuda":
            # One step at the measured shape first: autotuning (and Triton's
            # cache-flush buffer) and cuBLAS's heuristics stay out of the peak.
            step()
            x.grad = w.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - before
        else:
            before = rss_status("VmRSS")
            if not reset_peak():
                before = rss_status("VmHWM")
            step()
            extra = rss_status("VmHWM") - before
            before -= base_rss  # for the total: what the inputs added
        if case.impl not in FLOORS:
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


def spawn(case: Case, timeout: float) -> Result:
    cmd = [sys.executable, "-m", "margin_kernels.bench", "--worker", json.dumps(asdict(case))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Result(case, status="error", message=f"timed out after {timeout:.0f} s")
    for line in proc.stdout.splitlines():  # the autotuner's choices (TRITON_PRINT_AUTOTUNING=1), into the log
        if "autotuning" in line.lower() or "best config" in line.lower():
            sys.stderr.write(f"  [{case.impl} C={case.classes}] {line.strip()}\n")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            data = json.loads(line)
            data["case"] = case
            return Result(**data)
    if proc.returncode < 0 or "MemoryError" in proc.stderr or "Killed" in proc.stderr:
        return Result(case, status="oom", message=f"worker died (signal {-proc.returncode})")
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return Result(case, status="error", message=tail[:200])

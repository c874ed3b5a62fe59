"""Tables and plots of the measurements."""
from __future__ import annotations

import sys
import time

from .worker import Result


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


def mib(n: int | None) -> str:
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
                mem = mib(r.workspace_bytes)
                ratio = f"{r.workspace_bytes / base.workspace_bytes:.3f}" if base and base.workspace_bytes else "n/a"
            lines.append(f"{c:>10,} {r.case.impl:<16} {r.time_ms:>11,.1f} {useful_tflops(r):>8.3f} {speed:>8} "
                         f"{mem:>14} {ratio:>8}")
    return "\n".join(lines)


def format_overheads(results: list[Result]) -> str:
    """Time of each fused backend over the bare GEMMs, per C: cpp and triton over
    the three-GEMM floor, and cpp over its own four block GEMMs (its epilogue cost)."""
    pairs = [("cpp", "gemm-floor"), ("cpp", "cpp-gemms"), ("triton", "gemm-floor"), ("triton-split", "gemm-floor")]
    ok = {(r.case.impl, r.case.classes): r.time_ms for r in results if r.status == "ok"}
    lines = []
    for c in dict.fromkeys(r.case.classes for r in results):
        ratios = [f"{a} / {b} = {ok[a, c] / ok[b, c]:.2f}x" for a, b in pairs if (a, c) in ok and (b, c) in ok]
        if ratios:
            lines.append(f"  C={c:,}: " + ", ".join(ratios))
    return "time over bare GEMMs:\n" + "\n".join(lines) if lines else ""


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


def format_scale(found, budget_gib: float, naive: str = "reference") -> str:
    base = next((c for impl, c, _ in found if impl == naive), 0)
    head = f"{'implementation':<16} {'max classes':>14} {'/ naive':>8}   (budget {budget_gib:g} GiB)"
    lines = [head, "-" * len(head)]
    for impl, c, _ in found:
        ratio = f"{c / base:.1f}x" if base else "n/a"
        lines.append(f"{impl:<16} {c:>14,} {ratio:>8}")
    return "\n".join(lines)
